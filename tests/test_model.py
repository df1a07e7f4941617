"""The Transformer: fastlm backends agree with the torch path, it learns, the KV cache is exact."""

import math

import pytest
import torch

from fastlm.model import Transformer, TransformerConfig
from fastlm.nn import CausalSelfAttention
from fastlm.nn.self_attention import KVCache
from fastlm.reference import assert_within_twice_torch

pytestmark = pytest.mark.usefixtures("one_thread")


VARIANTS = {
    "gpt2-style": dict(norm="layernorm", pos="learned"),
    "llama-style": dict(norm="rmsnorm", pos="rope", n_kv_head=2, bias=False, mlp="swiglu"),
    "rope-gelu": dict(norm="layernorm", pos="rope"),
}


def tiny(**kw) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, d_model=64), **kw})


def _dtype(backend: str) -> torch.dtype:
    # The GPU backends compute in at most float32.
    return torch.float64 if backend in ("torch", "cpu") else torch.float32




def _run(model, ids, backend):
    """Logits of a forward pass; the loss and gradients of another that computes the loss without
    them (the chunked cross-entropy on fastlm backends)."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits, _ = model(ids, backend=backend)
    out, loss = model(ids, ids.roll(-1, 1), backend=backend)
    assert out is None
    loss.backward()
    return {"logits": logits, "loss": loss.detach(),
            **{f"grad of {n}": p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_backend_matches_torch_forward_and_gradients(backend, device, variant):
    """Logits, loss and every parameter's gradient of the same float32 weights, against the torch
    path in float64: the backend's error may be at most about twice torch's own float32 error."""
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[variant])).to(device)
    ids = torch.randint(0, 256, (2, 24), device=device)
    ours = _run(model, ids, backend)
    torch32 = _run(model, ids, "torch")
    ref = _run(model.double(), ids, "torch")
    for name, r in ref.items():
        assert_within_twice_torch(ours[name], torch32[name], r, floor=1e-6, name=name)


def test_quantized_model_matches_torch_path(backend, device):
    """After quantize_, the MLP's bias add still moves into the GELU on fastlm backends (behind a
    quantized matmul): the loss and the input-side gradients equal the torch path's."""
    import fastlm

    torch.manual_seed(0)
    model = Transformer(tiny()).to(device)
    fastlm.quantize_(model, bits=8)
    ids = torch.randint(0, 256, (2, 24), device=device)
    out = {}
    for b in (backend, "torch"):
        model.zero_grad(set_to_none=True)
        _, loss = model(ids, ids.roll(-1, 1), backend=b)
        loss.backward()
        out[b] = (loss.detach(), model.blocks[0].mlp.fc.bias.grad.clone())
    torch.testing.assert_close(out[backend][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[backend][1], out["torch"][1], rtol=1e-4, atol=1e-6)


def test_presets_have_the_advertised_sizes():
    sizes = {p: Transformer(TransformerConfig.preset(p)).num_params() / 1e6 for p in ("tiny", "small")}
    assert 1 <= sizes["tiny"] <= 3
    assert 15 <= sizes["small"] <= 30
    with torch.device("meta"):
        assert 120 <= Transformer(TransformerConfig.preset("gpt2")).num_params() / 1e6 <= 130


def test_swiglu_has_the_gelu_mlps_parameters():
    """2/3 of the hidden width over three matrices: within the rounding to a multiple of 8."""
    gelu, swiglu = (Transformer(tiny(mlp=m, bias=False)) for m in ("gelu", "swiglu"))
    assert abs(swiglu.num_params() - gelu.num_params()) <= 2 * 3 * 8 * 64
    mlp = swiglu.blocks[0].mlp
    assert mlp.gate_proj.out_features == 176 and mlp.down_proj.in_features == 176
    # Only the residual branches' last projections get the depth-scaled init.
    torch.manual_seed(0)
    big = Transformer(TransformerConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, d_model=256, mlp="swiglu"))
    assert big.blocks[0].mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    with pytest.raises(ValueError, match="mlp"):
        tiny(mlp="relu")


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, d_model=256))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().max().item() == 0
    # The output projection is the token embedding itself.
    assert "lm_head.weight" not in model.state_dict()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_overfits_one_batch(variant):
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[variant]))
    ids = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(80):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_generation_equals_full_recompute(backend, device, variant):
    torch.manual_seed(0)
    model = Transformer(tiny(**VARIANTS[variant])).to(device, _dtype(backend))
    prompt = torch.randint(0, 256, (3, 5), device=device)
    cached = model.generate(prompt, 20, temperature=0, backend=backend)
    full = model.generate(prompt, 20, temperature=0, use_cache=False, backend=backend)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :5], prompt)


def test_cached_logits_equal_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny(pos="rope", n_kv_head=1)).double().eval()
    ids = torch.randint(0, 256, (2, 12))
    full, _ = model(ids)
    caches = model.new_caches(2, 16)
    parts = [model(ids[:, :7], caches=caches)[0]] + [model(ids[:, t:t + 1], caches=caches)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-12)


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = Transformer(tiny())
    prompt = torch.randint(0, 256, (2, 4))
    a = model.generate(prompt, 12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = model.generate(prompt, 12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 12, temperature=0)
    assert torch.equal(model.generate(prompt, 12, temperature=1.5, top_k=1, seed=3), greedy)
    assert torch.equal(model.generate(prompt, 12, temperature=1.0, top_p=1e-6, seed=3), greedy)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="norm"):
        tiny(norm="batchnorm")
    with pytest.raises(ValueError, match="preset"):
        TransformerConfig.preset("huge")
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, top_p=1.5)
    with pytest.raises(ValueError, match="ids"):
        model(torch.zeros(4, dtype=torch.long))


def test_attention_module_and_cache_checks():
    attn = CausalSelfAttention(64, 8, 2, rotary=True, max_seq_len=16)
    assert attn.qkv.out_features == (8 + 2 * 2) * 8
    assert not any("cos" in k or "sin" in k for k in attn.state_dict())
    cache = attn.new_cache(batch=2, max_len=4)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 2, 4, 8)
    attn(torch.randn(2, 3, 64), cache)
    assert cache.seqlens.tolist() == [3, 3]
    with pytest.raises(ValueError, match="overflow"):
        attn(torch.randn(2, 2, 64), cache)
    with pytest.raises(ValueError, match="n_kv_head"):
        CausalSelfAttention(64, 8, 3)


@pytest.mark.parametrize("field, value, err", [
    ("n_head", 0, ValueError), ("n_head", -2, ValueError), ("d_model", 0, ValueError),
    ("n_head", 2.0, TypeError), ("vocab_size", "256", TypeError), ("n_layer", True, TypeError),
    ("n_kv_head", 0, ValueError), ("n_kv_head", 1.5, TypeError),
])
def test_config_sizes_are_checked_before_use(field, value, err):
    """n_head 0 used to escape as ZeroDivisionError from d_model % n_head."""
    with pytest.raises(err, match=field):
        tiny(**{field: value})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_empty_time_dimension_works_like_torch(backend, device, variant):
    """ids (B, 0): every layer sees empty tensors, and the logits come back (B, 0, V), as torch's
    modules give; the position embedding used to fail reshaping (-1, 0)."""
    model = Transformer(tiny(**VARIANTS[variant])).to(device)
    ids = torch.zeros(2, 0, dtype=torch.long, device=device)
    logits, _ = model(ids, backend=backend)
    assert logits.shape == (2, 0, 256)
    ref, _ = model(ids, backend="torch")
    assert ref.shape == logits.shape


@pytest.mark.parametrize("kwargs, name, err", [
    (dict(max_new_tokens=2.5), "max_new_tokens", TypeError),
    (dict(max_new_tokens=-1), "max_new_tokens", ValueError),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature", ValueError),
    (dict(max_new_tokens=2, temperature=float("inf")), "temperature", ValueError),
    (dict(max_new_tokens=2, temperature="hot"), "temperature", TypeError),
    (dict(max_new_tokens=2, top_k=2.0), "top_k", TypeError),
    (dict(max_new_tokens=2, top_p=float("nan")), "top_p", ValueError),
])
def test_generate_names_bad_sampling_arguments(kwargs, name, err):
    model = Transformer(tiny())
    with pytest.raises(err, match=name):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **kwargs)
