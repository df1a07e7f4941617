"""A patched, quantized transformers Llama / Mistral decoding with the whole decoder stack in one
kernel call (fastlm.hf_decode): the same tokens, scores and cache as transformers' own forward over
the same modules, and transformers' forward wherever the fused step does not apply."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastlm[hf])")

import fastlm  # noqa: E402
from fastlm import hf_decode  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
    pytest.skip(fastlm.backends.why_unavailable("cpu", "cpu"), allow_module_level=True)

VOCAB = 96


def build(family="llama", bits=4, group_size=32, quantize=True, **kw):
    torch.manual_seed(0)
    base = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mistral":
        base["sliding_window"] = None
    if family == "qwen2":  # its q, k and v projections have biases
        base["tie_word_embeddings"] = True
    cfg = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **{**base, **kw})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    fastlm.patch(model)
    if quantize:
        fastlm.quantize_(model, bits=bits, group_size=group_size, act_quant=True)
    return model


@pytest.fixture
def fused(monkeypatch):
    """Counts the decode steps that ran fused; fused.off() makes every step transformers' own."""
    real = hf_decode.decode_step
    calls = []

    def counting(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(hf_decode, "decode_step", counting)
    counting.calls = calls
    counting.off = lambda: monkeypatch.setattr(hf_decode, "decode_step", lambda *args: None)
    return counting


def generate(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                              pad_token_id=0, **kw)


def assert_same_run(got, want, rtol=1e-5):
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores, strict=True):
        assert ((a - b).abs().max() / b.abs().max()).item() <= rtol


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


@pytest.mark.parametrize("family,bits,group_size,batch,kw", [
    ("llama", 4, 32, 1, {}), ("llama", 4, 64, 3, {}), ("llama", 8, 32, 2, {}), ("mistral", 4, 32, 2, {}),
    ("qwen2", 4, 32, 2, {}), ("llama", 4, 32, 2, {"attention_bias": True, "mlp_bias": True}),
    ("llama", 4, 32, 1, {"rope_parameters": LLAMA3_ROPE}), ("qwen3", 4, 32, 2, {"head_dim": 32}),
    ("llama", 8, 32, 1, {"head_dim": 32}),
    ("llama", 4, 32, 1, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                             "original_max_position_embeddings": 64}})],
    ids=["llama-b1", "llama-g64-b3", "llama-int8", "mistral", "qwen2-biases", "llama-all-biases", "llama3-rope",
         "qwen3-qk-norms-head-dim-32", "llama-head-dim-32", "yarn-rope"])
def test_fused_steps_match_transformers(fused, family, bits, group_size, batch, kw):
    model = build(family, bits, group_size, **kw)
    ids = torch.randint(3, VOCAB, (batch, 7), generator=torch.Generator().manual_seed(1))
    got = generate(model, ids, 6)
    assert fused.calls == [False] + [True] * 5  # the prompt is transformers', each new token fused
    fused.off()
    assert_same_run(got, generate(model, ids, 6))


def test_the_cache_is_transformers_own_afterwards(fused):
    """After fused steps the DynamicCache holds the keys and values transformers' steps would, and a
    transformers step (two tokens: not a decode step) continues from it."""
    model = build()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    more = torch.randint(3, VOCAB, (2, 2), generator=torch.Generator().manual_seed(3))
    runs = []
    for on in (True, False):
        if not on:
            fused.off()
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            out = model(ids, cache=cache, use_cache=True)
            for _ in range(4):
                out = model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
            after = model(more, cache=cache, use_cache=True).logits
        runs.append((cache, after))
    assert fused.calls == [False] + [True] * 4 + [False]
    (c1, a1), (c2, a2) = runs
    for l1, l2 in zip(c1.layers, c2.layers, strict=True):
        assert l1.keys.shape == l2.keys.shape == (2, 2, 11, 16)
        torch.testing.assert_close(l1.keys, l2.keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l1.values, l2.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a1, a2, rtol=1e-4, atol=1e-5)


def test_buffer_grows_and_long_positions(fused):
    """A 3-token prompt and 150 new tokens: the buffers double twice, and the rotary angles of far
    positions agree with transformers' (within float32 rounding of its angles)."""
    model = build(num_hidden_layers=2)
    ids = torch.randint(3, VOCAB, (1, 3), generator=torch.Generator().manual_seed(4))
    got = generate(model, ids, 150)
    assert fused.calls.count(True) == 149
    for layer in got.past_key_values.layers if hasattr(got, "past_key_values") else got.cache.layers:
        kb = hf_decode._BUFFERS[layer][0]  # the keys are a view of a buffer with room to spare
        assert layer.keys.data_ptr() == kb.data_ptr() and kb.shape[2] > layer.keys.shape[2]
    fused.off()
    want = generate(model, ids, 150)
    n = min(len(got.scores), len(want.scores))
    for a, b in zip(got.scores[:n], want.scores[:n]):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-3


def test_beam_search_reorders_the_cache(fused):
    model = build()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert any(fused.calls)
    fused.off()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def _padded(left: bool):
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 7, dtype=torch.long)
    for row, pad in ((1, 2), (2, 5)):
        cols = slice(0, pad) if left else slice(7 - pad, 7)
        ids[row, cols], mask[row, cols] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_left_padded_batches(fused, family):
    """Rows of 7, 5 and 2 tokens, padded at the front: attention skips each row's padding and
    rotary takes each row's own position, as transformers does from the mask."""
    model = build(family, **({"head_dim": 32} if family == "qwen3" else {}))
    ids, mask = _padded(left=True)
    got = generate(model, ids, 5, attention_mask=mask)
    assert fused.calls == [False] + [True] * 4
    fused.off()
    assert_same_run(got, generate(model, ids, 5, attention_mask=mask))


@pytest.mark.parametrize("case", ["right padding", "float model", "sliding window", "hook", "q norm hook", "grad"])
def test_steps_it_does_not_cover_are_transformers(fused, case):
    kw, ids = {}, torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    if case == "right padding":
        model = build()
        ids, mask = _padded(left=False)
        kw = {"attention_mask": mask}
    elif case == "float model":
        model = build(quantize=False)
    elif case == "sliding window":
        model = build("mistral", sliding_window=4)
    elif case == "q norm hook":
        model = build("qwen3", head_dim=16)
        model.model.layers[1].self_attn.q_norm.register_forward_hook(lambda *args: None)
    else:
        model = build()
    if case == "hook":
        model.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    if case == "grad":
        with torch.enable_grad():
            out = model(ids, use_cache=True)
            logits = model(ids[:, :1], cache=out.cache, use_cache=True).logits
        assert logits.requires_grad
    else:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)
    assert fused.calls and not any(fused.calls)


def test_unpatch_removes_it(fused):
    model = build()
    fastlm.unpatch(model)
    assert "forward" not in model.model.__dict__
    ids = torch.randint(3, VOCAB, (1, 4))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert fused.calls == []


def test_benchmark_runs_each_competitor(fused):
    from fastlm.bench import hf as bench_hf

    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    r = bench_hf.quantized_decode(quick=True, config=small, model="qwen3-0.6b")
    assert r["model"] == "qwen3-0.6b" and r["config"]["head_dim"] == 128 and r["config"]["num_hidden_layers"] == 2
    assert set(r["rows"]) == set(bench_hf.DECODE_COMPETITORS)
    assert all(v > 0 for row in r["rows"].values() for v in row.values())
    assert any(fused.calls)
    assert hf_decode.ENABLED


def test_the_models_own_rotary_table_is_used(fused):
    """The table comes from the model's rotary module at every step: one changed in place (as a
    rope-scaling edit would) decodes as transformers decodes with it."""
    model = build()
    model.model.rotary_emb.inv_freq.mul_(0.5)
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(8))
    got = generate(model, ids, 4)
    assert fused.calls == [False, True, True, True]
    fused.off()
    assert_same_run(got, generate(model, ids, 4))


def test_left_padding_over_a_sliced_cache(fused):
    """One sequence of 560 positions, the first 300 padding: decode attention splits a cache this
    long into slices, which must start at the first real position."""
    model = build(num_key_value_heads=1, max_position_embeddings=1024, num_hidden_layers=2)
    ids = torch.randint(3, VOCAB, (1, 560), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(1, 560, dtype=torch.long)
    ids[0, :300], mask[0, :300] = 0, 0
    got = generate(model, ids, 3, attention_mask=mask)
    assert fused.calls == [False, True, True]
    fused.off()
    assert_same_run(got, generate(model, ids, 3, attention_mask=mask), rtol=1e-4)
