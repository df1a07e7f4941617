"""fastlm.lora: rank-r adapters train alone, start as a no-op and merge to the same outputs."""

import pytest
import torch

from fastlm import lora
from fastlm.model import Transformer, TransformerConfig
from fastlm.patch import quantize_


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=32, backend="torch", **kw)
    return Transformer(cfg).eval()


def _ids(seed=1):
    return torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(seed))


def test_fresh_adapters_change_nothing_and_only_adapters_train():
    model = _model()
    ids = _ids()
    before = model(ids)[0]
    lora.apply_lora(model, rank=4, alpha=8)
    assert torch.equal(model(ids)[0], before)  # B starts at zero
    wrapped = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
    assert len(wrapped) == 2 * 4  # qkv, attn proj, fc, mlp proj in each of two blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    # rank r: A is (r, in), B is (out, r).
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_a.shape == (4, 32) and qkv.lora_b.shape == (96, 4)
    assert lora.trainable_parameters(model) == sum(4 * (m.in_features + m.out_features) for m in wrapped)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        _, loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert qkv.lora_b.abs().sum() > 0


def test_swiglu_blocks_get_adapters_on_all_three_projections():
    model = _model(mlp="swiglu", pos="rope", norm="rmsnorm")
    ids = _ids()
    before = model(ids)[0]
    lora.apply_lora(model, rank=2)
    names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    assert names == {"qkv", "proj", "gate_proj", "up_proj", "down_proj"}
    assert torch.equal(model(ids)[0], before)
    _train_adapters(model, ids)
    model.eval()
    with torch.no_grad():
        with_adapters = model(ids)[0].double()
        merged = lora.merge_lora(model)(ids)[0].double()
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-5)


def _train_adapters(model, ids, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        _, loss = model(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_merge_gives_the_same_outputs_as_plain_linears():
    model = _model()
    ids = _ids()
    lora.apply_lora(model, rank=3)
    _train_adapters(model, ids)
    model.eval()
    with torch.no_grad():
        with_adapters = model(ids)[0].double()
    state = lora.lora_state_dict(model)
    assert state and all(k.endswith((".lora_a", ".lora_b")) for k in state)
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert type(model.blocks[0].attn.qkv) is torch.nn.Linear
    with torch.no_grad():
        merged = model(ids)[0].double()
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-5)
    # The adapters saved on their own restore the same model on a fresh copy of the base.
    fresh = lora.apply_lora(_model(), rank=3)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all(".lora_" not in k for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids)[0].double(), with_adapters, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_adapters_on_a_quantized_base(bits):
    model = _model()
    quantize_(model, bits=bits, group_size=32)
    ids = _ids()
    lora.apply_lora(model, rank=2)
    assert all(isinstance(m.base, torch.nn.Module) and type(m.base).__name__ == "QuantLinear"
               for m in model.modules() if isinstance(m, lora.LoRALinear))
    qweights = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    model.train()
    _train_adapters(model, ids)
    assert all(torch.equal(b, qweights[n]) for n, b in model.named_buffers() if n.endswith("qweight"))
    model.eval()
    with torch.no_grad():
        want = model(ids)[0]
        lora.merge_lora(model)
        torch.testing.assert_close(model(ids)[0], want, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        lora.LoRALinear(torch.nn.Linear(4, 4), rank=0)
    with pytest.raises(TypeError, match="base"):
        lora.LoRALinear(torch.nn.Conv1d(4, 4, 1), rank=2)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.apply_lora(torch.nn.Sequential(torch.nn.ReLU()), rank=2)
