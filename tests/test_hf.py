"""fastlm.patch on Hugging Face transformers models built from small configs: what it swaps, that
torch's sdpa never runs afterwards, and that outputs, gradients, training, generation and unpatch
are the unpatched model's."""

import copy
import gc
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastlm[hf])")

import fastlm  # noqa: E402
from fastlm import hf  # noqa: E402
from fastlm.reference import assert_within_twice_torch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
CAUSAL = ["gpt2", "llama", "mistral", "qwen2", "qwen3"]
ENCODERS = ["bert", "roberta"]

# Swapped per kind for 2 layers: the counts the README quotes.
COUNTS = {
    "gpt2": {"attention": 2, "gelu_mlp": 2, "layer_norm": 5, "embedding": 2, "loss": 1},
    "llama": {"attention": 2, "rotary": 2, "swiglu_mlp": 2, "rms_norm": 5, "embedding": 1, "decode_stack": 1,
              "loss": 1},
    "mistral": {"attention": 2, "rotary": 2, "swiglu_mlp": 2, "rms_norm": 5, "embedding": 1, "decode_stack": 1,
                "loss": 1},
    "qwen2": {"attention": 2, "rotary": 2, "swiglu_mlp": 2, "rms_norm": 5, "embedding": 1, "decode_stack": 1,
              "loss": 1},
    "qwen3": {"attention": 2, "rotary": 2, "swiglu_mlp": 2, "rms_norm": 9, "embedding": 1, "decode_stack": 1,
              "loss": 1},
    "bert": {"attention": 2, "gelu_mlp": 2, "add_layer_norm": 4, "layer_norm": 5, "embedding": 3},
    "roberta": {"attention": 2, "gelu_mlp": 2, "add_layer_norm": 4, "layer_norm": 5, "embedding": 3},
}


def config(family: str, **kw):
    if family == "gpt2":
        base = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                    bos_token_id=1, eos_token_id=2)
    elif family in ENCODERS:
        base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
                    pad_token_id=0)
    else:
        # GQA (4 query heads, 2 KV heads); Mistral with a window shorter than the test sequences.
        base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, tie_word_embeddings=family == "qwen2")
        if family == "mistral":
            base["sliding_window"] = 4
        if family == "qwen3":
            base["head_dim"] = 16
    return transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **{**base, **kw})


def build(family: str, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    auto = transformers.AutoModel if family in ENCODERS else transformers.AutoModelForCausalLM
    model = auto.from_config(config(family, **kw)).to(dtype)
    # Non-trivial norm weights and biases, so their gradients and the weight-dtype paths are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(b=2, t=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -3:] = 0  # right padding on the second row
    return ids, mask


@pytest.fixture
def no_torch_sdpa(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch.nn.functional.scaled_dot_product_attention was called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", boom)


def outputs(model, family, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.last_hidden_state if family in ENCODERS else out.logits


@pytest.mark.parametrize("family", CAUSAL + ENCODERS)
def test_counts_and_no_torch_sdpa(family, no_torch_sdpa):
    model = build(family)
    fastlm.patch(model)
    report = hf.patch_report(model)
    assert {k: v for k, v in report.items() if v} == COUNTS[family]
    assert model.config._attn_implementation == hf.ATTENTION
    ids, mask = batch()
    with torch.no_grad():
        outputs(model, family, ids, mask)


def _loss(model, family, ids, mask):
    if family in ENCODERS:
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        w = torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view(h.shape)
        return (h * w * mask[..., None]).sum()
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("family", CAUSAL + ENCODERS)
def test_float32_outputs_and_every_gradient_match(family, monkeypatch):
    ref = build(family)
    model = fastlm.patch(copy.deepcopy(ref))
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, family, ids, mask), outputs(ref, family, ids, mask),
                                   rtol=1e-5, atol=1e-5)
    ref_loss = _loss(ref, family, ids, mask)
    ref_loss.backward()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)
    loss = _loss(model, family, ids, mask)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is None:  # BERT's pooler is not in this loss
            assert p.grad is None and "pooler" in name, name
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_bfloat16_within_twice_torch(family):
    exact = build(family, torch.float64)
    slow = build(family, torch.bfloat16)
    fast = fastlm.patch(build(family, torch.bfloat16))
    ids, mask = batch()
    losses = [_loss(m, family, ids, mask) for m in (exact, slow, fast)]
    for loss in losses:
        loss.backward()
    assert_within_twice_torch(losses[2], losses[1], losses[0], floor=1e-2, name=f"{family} loss")
    with torch.no_grad():
        got = [outputs(m, family, ids, mask) for m in (exact, slow, fast)]
    assert_within_twice_torch(got[2], got[1], got[0], floor=2e-2, name=f"{family} outputs")
    params = [dict(m.named_parameters()) for m in (exact, slow)]
    for name, p in fast.named_parameters():
        if p.grad is None:
            continue
        assert_within_twice_torch(p.grad, params[1][name].grad, params[0][name].grad, floor=3e-2, name=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_twenty_adamw_steps_same_loss_curve(family):
    ref = build(family)
    model = copy.deepcopy(ref)
    # The optimizer is built before patching: it must keep training the same Parameters.
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (ref, model)]
    fastlm.patch(model)
    ids, mask = batch(b=4, t=12)
    curves = [[], []]
    for _ in range(20):
        for m, opt, curve in zip((ref, model), opts, curves):
            loss = _loss(m, family, ids, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
    assert curves[1][-1] < curves[1][0] - 0.5
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_generate_with_cache_same_tokens(family, monkeypatch):
    ref = build(family).eval()
    model = fastlm.patch(copy.deepcopy(ref))
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)
    got = model.generate(ids, **kw)
    monkeypatch.undo()
    assert torch.equal(got, ref.generate(ids, **kw))
    # generate() reads the forward's signature to pass attention_mask and logits_to_keep.
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_generate_with_left_padding_same_tokens(family):
    ref = build(family).eval()
    model = fastlm.patch(copy.deepcopy(ref))
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_leaves_the_unpadded_sequences_logits_alone(family, side):
    model = fastlm.patch(build(family).eval())
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(3, VOCAB, (10,), generator=g), torch.randint(3, VOCAB, (6,), generator=g)
    pad = torch.zeros(4, dtype=torch.long)
    row = torch.cat((pad, short)) if side == "left" else torch.cat((short, pad))
    ids = torch.stack((long, row))
    mask = (torch.arange(10) >= 4) if side == "left" else (torch.arange(10) < 6)
    mask = torch.stack((torch.ones(10, dtype=torch.bool), mask)).long()
    kw = {}
    if side == "left":
        # As generate() does: positions count only real tokens.
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask, **kw).logits
        alone = model(input_ids=long[None]).logits[0]
        short_alone = model(input_ids=short[None]).logits[0]
    torch.testing.assert_close(both[0], alone, rtol=1e-5, atol=1e-5)
    real = both[1, 4:] if side == "left" else both[1, :6]
    torch.testing.assert_close(real, short_alone, rtol=1e-5, atol=1e-5)


def test_sliding_window_is_kept():
    """Mistral's window of 4 over 10 tokens: the patched model matches transformers' windowed sdpa
    and differs from full attention."""
    ref, full = build("mistral").eval(), build("mistral", sliding_window=None).eval()
    model = fastlm.patch(copy.deepcopy(ref))
    ids, _ = batch()
    with torch.no_grad():
        got, want, unwindowed = model(ids).logits, ref(ids).logits, full(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - unwindowed).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_unpatch_restores_everything(family):
    model = build(family).eval()
    ids, mask = batch()
    with torch.no_grad():
        before = outputs(model, family, ids, mask)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    classes = [type(m) for m in model.modules()]
    seen = []
    layer = next(m for m in model.modules() if hf._is_attention(m))
    handle = layer.register_forward_hook(lambda *a: seen.append(1))
    fastlm.patch(model)
    assert list(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    with torch.no_grad():
        patched = outputs(model, family, ids, mask)
    assert seen, "a hook registered before patch must still run"
    gc.collect()  # patched models of earlier tests, dropped without unpatch, release their claims
    fastlm.unpatch(model)
    handle.remove()
    assert [type(m) for m in model.modules()] == classes
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation == "sdpa" and hf.patch_report(model) == {}
    assert not hf._ROTARY
    with torch.no_grad():
        after = outputs(model, family, ids, mask)
    assert torch.equal(after, before)
    torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-5)


def test_unpatched_models_of_a_patched_family_are_untouched():
    """apply_rotary_pos_emb is replaced in the modeling module; a second, unpatched Llama still runs
    transformers' own formula (bit for bit)."""
    a, b = build("llama").eval(), build("llama").eval()
    ids, _ = batch()
    with torch.no_grad():
        want = b(ids).logits
        fastlm.patch(a)
        got = b(ids).logits
        fastlm.unpatch(a)
    assert torch.equal(got, want)


def test_uncovered_family_is_left_alone_and_reported():
    cfg = transformers.AutoConfig.for_model("opt", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                                            max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    classes = [type(m) for m in model.modules()]
    with pytest.warns(UserWarning, match="left unpatched: model family 'opt' is not covered"):
        fastlm.patch(model)
    assert [type(m) for m in model.modules()] == classes
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert "opt" in hf.patch_report(model)["unsupported"]
    fastlm.unpatch(model)
    assert hf.patch_report(model) == {}


def test_fused_loss_returns_no_logits_in_training_and_full_logits_in_eval():
    model = fastlm.patch(build("llama"))
    ids, mask = batch()
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.logits.shape == (2, 10, VOCAB)
    # num_items_in_batch (gradient accumulation): the sum over that many tokens.
    with torch.no_grad():
        mean = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(9)).loss
    torch.testing.assert_close(summed, mean * (2 * 9) / 9)


def test_patch_is_idempotent_and_warns_nothing_for_covered_families():
    model = build("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fastlm.patch(model)
        fastlm.patch(model)
    assert hf.patch_report(model)["attention"] == 2
    fastlm.unpatch(model)


_FSDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
import fastlm
import test_hf as t

dist.init_process_group("gloo")
rank = dist.get_rank()
model = fastlm.patch(t.build("llama"))
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
ids, _ = t.batch(b=4, t=12)
local = ids[2 * rank: 2 * rank + 2]
for _ in range(3):
    model(input_ids=local, labels=local).loss.backward()
    opt.step()
    opt.zero_grad()
full = {n: p.full_tensor() for n, p in model.named_parameters()}
if rank == 0:
    torch.save(full, sys.argv[2])
# Both ranks leave together: a rank that tore gloo down while the other still used it was seen
# to abort at exit ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_two_processes_match_unsharded_training(tmp_path):
    """A patched Llama under FSDP2 (fully_shard per decoder layer, 2 processes, gloo) ends with the
    parameters of unsharded, unpatched training on the same global batch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script, out = tmp_path / "fsdp.py", tmp_path / "params.pt"
    script.write_text(_FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(Path(__file__).parent), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ref = build("llama")
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    ids, _ = batch(b=4, t=12)
    for _ in range(3):
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    got = torch.load(out)
    want = dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for name, p in got.items():
        torch.testing.assert_close(p, want[name].detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_recomputes_through_the_fastlm_layers(monkeypatch):
    ref = build("llama")
    model = fastlm.patch(copy.deepcopy(ref))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    assert model.model.layers[0].gradient_checkpointing
    ids, mask = batch()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)
    loss = _loss(model, "llama", ids, mask)
    loss.backward()
    monkeypatch.undo()
    ref_loss = _loss(ref, "llama", ids, mask)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_layer_fastlm_does_not_cover_keeps_its_own_forward():
    """A Llama whose MLP activation is ReLU: its MLPs keep transformers' forward (and are not counted),
    everything else is patched, and the outputs are the unpatched model's."""
    ref = build("llama", hidden_act="relu").eval()
    model = fastlm.patch(copy.deepcopy(ref))
    report = hf.patch_report(model)
    assert "swiglu_mlp" not in report and report["attention"] == 2 and report["rms_norm"] == 5
    assert "forward" not in model.model.layers[0].mlp.__dict__
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(outputs(model, "llama", ids, mask), outputs(ref, "llama", ids, mask),
                                   rtol=1e-5, atol=1e-5)


def test_the_benchmark_measures_a_patched_step_at_the_shape_it_is_given():
    from fastlm.bench import hf as bench_hf

    r = bench_hf.measure("llama-100m", "transformers+fastlm", "cpu", quick=True,
                         shape=dict(batch=1, seq=16, reps=1), train_only=True)
    assert set(r) == {"train_tokens_per_s", "train_step_s", "train_peak_bytes", "swapped", "params"}
    assert r["train_tokens_per_s"] == pytest.approx(16 / r["train_step_s"])
    assert r["swapped"] == COUNTS["llama"]  # the quick model has 2 layers


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2 here ties its head to the embedding
def test_quantized_patched_model_integer_path_near_its_float_path(family):
    """fastlm.quantize_ on a patched transformers model: every Linear (a tied head excepted) a
    QuantLinear; the CPU integer path (act_quant) within the activations' rounding of the exact
    float path over the same int4 weights, and generate() runs on it."""
    if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip(fastlm.backends.why_unavailable("cpu", "cpu"))
    ids, mask = batch()
    exact = fastlm.quantize_(fastlm.patch(build(family).eval()), bits=4, group_size=32)
    fast = fastlm.quantize_(fastlm.patch(build(family).eval()), bits=4, group_size=32, act_quant=True)
    quantized = [m for m in fast.modules() if isinstance(m, fastlm.nn.QuantLinear)]
    assert len(quantized) == 2 * 7 + (family != "qwen2")
    left = [name for name, m in fast.named_modules() if type(m) is torch.nn.Linear]
    assert left == (["lm_head"] if family == "qwen2" else [])
    with torch.no_grad():
        want, got = outputs(exact, family, ids, mask), outputs(fast, family, ids, mask)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 0.03
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :10], ids)


def test_quantized_tied_head_stays_untied():
    """quantize_tied on a transformers model whose head is tied (Qwen2 here): the config no longer
    ties them, so transformers' tie_weights leaves the QuantLinear alone, and generate() runs."""
    model = fastlm.quantize_(fastlm.patch(build("qwen2").eval()), bits=4, group_size=32, act_quant=True,
                             quantize_tied=True)
    assert type(model.lm_head) is fastlm.nn.QuantLinear and not model.config.tie_word_embeddings
    model.tie_weights()
    assert type(model.lm_head) is fastlm.nn.QuantLinear and model.model.embed_tokens.weight.dtype == torch.float32
    ids, mask = batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :10], ids)
