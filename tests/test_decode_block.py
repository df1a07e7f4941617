"""The quantized Llama blocks at decode in one call (torch.ops.fastlm_C.decode_blocks, taken by
fastlm.model's Transformer for its whole stack and by a Block alone): against a float64 block over
the dequantized weights, bit for bit against the modules it stands for, and only where it applies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import fastlm
import fastlm.model as fm
from fastlm import backends, quant
from fastlm import reference as ref
from fastlm.model import Transformer, TransformerConfig

pytestmark = pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no CPU extension")

# quantize_ arguments: int8, int4 in each scale dtype and group size, symmetric and not.
FORMATS = {
    "int8": dict(bits=8),
    "int4-g32": dict(bits=4, group_size=32),
    "int4-g64-asym-bf16": dict(bits=4, group_size=64, symmetric=False, scale_dtype=torch.bfloat16),
    "int4-g128-fp16": dict(bits=4, group_size=128, scale_dtype=torch.float16),
}


def llama(n_kv_head=2, quantize=True, bias=False, **fmt) -> Transformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=300, block_size=48, n_layer=3, n_head=4, n_kv_head=n_kv_head, d_model=384,
                            mlp="swiglu", norm="rmsnorm", pos="rope", bias=bias)
    model = Transformer(cfg).eval()
    if quantize:
        fastlm.quantize_(model, act_quant=True, quantize_tied=True, **(fmt or FORMATS["int4-g32"]))
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Each try at a fused call: (blocks, whether they ran fused); `off()` sends every block
    through its modules."""
    real = fm._decode_blocks
    calls = []

    def counting(blocks, *args):
        out = real(blocks, *args)
        calls.append((len(blocks), out is not None))
        return out

    monkeypatch.setattr(fm, "_decode_blocks", counting)
    counting.off = lambda: monkeypatch.setattr(fm, "_decode_blocks", lambda *args: None)
    counting.calls = calls
    return counting


def decode(model, ids, steps):
    """Prefill ids, then `steps` greedy tokens; returns the logits of every step and the caches."""
    caches = model.new_caches(ids.shape[0], 32)
    logits, _ = model(ids, caches=caches, backend="cpu")
    out = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits, _ = model(nxt, caches=caches, backend="cpu")
        out.append(logits)
    return torch.stack(out), caches


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
# batch 17: the 512-bit kernels take 16 rows of x at once, then one
@pytest.mark.parametrize("batch,n_kv_head", [(1, 2), (3, 4), (17, 2)], ids=["b1-gqa", "b3-mha", "b17-gqa"])
@torch.no_grad()
def test_matches_the_modules_bit_for_bit(fused_calls, fmt, batch, n_kv_head):
    model = llama(n_kv_head, **FORMATS[fmt])
    ids = torch.randint(0, 300, (batch, 5))
    got, got_caches = decode(model, ids, 4)
    # the prefill through the modules, then each step's three blocks in one call
    assert fused_calls.calls == [(1, False)] * 3 + [(3, True)] * 4
    fused_calls.off()
    want, want_caches = decode(model, ids, 4)
    assert torch.equal(got, want)
    for g, w in zip(got_caches, want_caches):
        assert torch.equal(g.k, w.k) and torch.equal(g.v, w.v) and torch.equal(g.seqlens, w.seqlens)
        assert g.longest == w.longest == 9


@torch.no_grad()
def test_biases_match_the_modules_bit_for_bit(fused_calls):
    model = llama(bias=True, **FORMATS["int4-g32"])
    for m in model.modules():  # biases away from zero, so that a missing one shows
        if isinstance(m, fastlm.nn.QuantLinear) and m.bias is not None:
            m.bias.copy_(torch.randn_like(m.bias))
    ids = torch.randint(0, 300, (2, 5))
    got, _ = decode(model, ids, 3)
    assert fused_calls.calls == [(1, False)] * 3 + [(3, True)] * 3
    fused_calls.off()
    want, _ = decode(model, ids, 3)
    assert torch.equal(got, want)


def reference_block(block, x, residual, k_cache, v_cache, pos):
    """The block in float64 over its dequantized weights, each projection's input quantized as
    the integer kernel quantizes it (reference.act_quant): (mlp out, h)."""
    attn, mlp = block.attn, block.mlp
    b, c = x.shape
    hq, hk, d = attn.n_head, attn.n_kv_head, attn.head_dim

    def lin(layer, t):
        return ref.act_quant(t.float()) @ quant.dequantize(layer.weight, torch.float64).T

    y, h = ref.rms_norm(x, (c,), block.norm1.weight, block.norm1.eps, residual)
    q, k, v = lin(attn.qkv, y).split([hq * d, hk * d, hk * d], -1)
    cos, sin = ref.rotary_tables(torch.full((b, 1), pos), attn.rotary.theta, d)
    q = ref.rotary(q.view(b, 1, hq, d).transpose(1, 2), cos[:, None], sin[:, None])
    k = ref.rotary(k.view(b, 1, hk, d).transpose(1, 2), cos[:, None], sin[:, None])
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kc[:, :, pos], vc[:, :, pos] = k[:, :, 0], v.view(b, hk, d)
    att = ref.decode_attention(q, kc, vc, torch.full((b,), pos + 1), scale=1 / math.sqrt(d))
    o = lin(attn.proj, att.transpose(1, 2).reshape(b, c))
    y2, h2 = ref.rms_norm(o, (c,), block.norm2.weight, block.norm2.eps, h.double())
    a = ref.silu_mul(lin(mlp.gate_proj, y2), lin(mlp.up_proj, y2))
    return lin(mlp.down_proj, a), h2, kc, vc


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("first", [True, False], ids=["first-block", "later-block"])
@torch.no_grad()
def test_against_float64(fused_calls, fmt, first):
    model = llama(**FORMATS[fmt])
    block, b, c, pos = model.blocks[1], 2, 384, 6
    for nrm in (block.norm1, block.norm2):  # weights away from 1, so that a missing one shows
        nrm.weight.copy_(1 + 0.5 * torch.randn(c))
    cache = block.attn.new_cache(b, 16)
    cache.k[:, :, :pos], cache.v[:, :, :pos] = torch.randn(2, b, 2, pos, 96).unbind(0)
    cache.seqlens.fill_(pos)
    cache.longest = pos
    x, residual = torch.randn(b, 1, c), None if first else torch.randn(b, 1, c)
    k0, v0 = cache.k.clone(), cache.v.clone()
    with fastlm.ops.use_backend("cpu"):
        out, h = block(x, residual, cache)
    assert fused_calls.calls == [(1, True)]
    want, want_h, want_k, want_v = reference_block(block, x[:, 0], None if first else residual[:, 0], k0, v0, pos)
    assert ref.error(out[:, 0], want) < 1e-5
    assert ref.error(h[:, 0], want_h) < 1e-6
    assert ref.error(cache.k, want_k) < 1e-6 and ref.error(cache.v, want_v) < 1e-6
    assert cache.seqlens.tolist() == [pos + 1] * b and cache.longest == pos + 1


@torch.no_grad()
def test_only_where_it_applies(fused_calls):
    ids = torch.randint(0, 300, (1, 4))
    model = llama()
    seen = []
    hook = model.blocks[0].mlp.down_proj.register_forward_hook(lambda *args: seen.append(1))
    decode(model, ids, 1)
    # a hooked block: the stack falls back to block by block, and the other two still fuse
    assert fused_calls.calls == [(1, False)] * 3 + [(3, False), (1, False), (1, True), (1, True)] and seen == [1, 1]
    hook.remove()

    fused_calls.calls.clear()
    decode(model.train(), ids, 1)  # dropout may be active
    model.eval()
    with torch.enable_grad():  # a gradient may be wanted
        decode(model, ids, 1)
    with fastlm.ops.use_backend("torch"):  # the reference path was asked for
        caches = model.new_caches(1, 8)
        model(ids, caches=caches)
        model(ids[:, :1], caches=caches)
    assert not any(fused for _, fused in fused_calls.calls)

    float_weights = llama(quantize=False)
    float_path = llama(quantize=False)
    fastlm.quantize_(float_path, bits=8, act_quant=False)  # the exact float path stays the modules'
    for other in (float_weights, float_path):
        fused_calls.calls.clear()
        decode(other, ids, 1)
        assert fused_calls.calls == [(1, False)] * 3 + [(3, False)] + [(1, False)] * 3


@torch.no_grad()
def test_full_cache_raises_as_the_modules_do():
    model = llama()
    block = model.blocks[0]
    cache = block.attn.new_cache(1, 4)
    block(torch.randn(1, 4, 384), None, cache)
    with pytest.raises(ValueError, match="overflow the cache"):
        block(torch.randn(1, 1, 384), None, cache)


def test_raw_op_errors():
    model = llama()
    blocks = model.blocks[:2]
    caches = [blk.attn.new_cache(2, 8) for blk in blocks]

    def linears(blk):
        return (blk.attn.qkv, blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj)

    def call(x=None, k=None, lens=None, position=0, drop=0, residual=None, lins=None, norms=None):
        lins = [m for blk in blocks for m in linears(blk)] if lins is None else lins
        lins = lins[:len(lins) - drop]
        return torch.ops.fastlm_C.decode_blocks(
            torch.randn(2, 1, 384) if x is None else x, residual,
            [blk.norm1.weight for blk in blocks] if norms is None else norms, [blk.norm2.weight for blk in blocks],
            1e-5, [m.qweight for m in lins], [m.scales for m in lins], [m.zeros for m in lins], [None] * len(lins),
            [m.bits for m in lins], [m.group_size for m in lins],
            [c.k for c in caches[:-1]] + [caches[-1].k if k is None else k],
            [c.v for c in caches], [c.seqlens for c in caches[:-1]] + [caches[-1].seqlens if lens is None else lens],
            position, 4, 2, 10000.0, 96 ** -0.5, [], [], 0, None, None, None)

    out, h = call()
    assert out.shape == h.shape == (2, 1, 384) and [c.seqlens.tolist() for c in caches] == [[1, 1], [1, 1]]
    with pytest.raises(RuntimeError, match="decode_blocks: x must be a contiguous float32"):
        call(x=torch.randn(2, 1, 384, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="decode_blocks: residual must be a contiguous float32 CPU tensor of x's"):
        call(residual=torch.randn(2, 384), position=1)
    with pytest.raises(RuntimeError, match="decode_blocks: qweights, scales, zeros, biases, bits and group_sizes must"):
        call(position=1, drop=1)
    with pytest.raises(RuntimeError, match="decode_blocks: norm1, norm2, k_caches, v_caches and cache_seqlens must"):
        call(position=1, norms=[blocks[0].norm1.weight])
    with pytest.raises(RuntimeError, match="decode_blocks: position 8 must lie in"):
        call(position=8)
    with pytest.raises(RuntimeError, match="decode_blocks: block 1's k_cache must be"):
        call(k=torch.zeros(2, 2, 8, 48), position=1)
    with pytest.raises(RuntimeError, match="decode_blocks: block 1's cache_seqlens must be"):
        call(lens=torch.ones(2, dtype=torch.int64), position=1)
    swapped = [m for blk in blocks for m in linears(blk)]
    swapped[5], swapped[6] = swapped[6], swapped[5]  # block 1's qkv and proj
    with pytest.raises(RuntimeError, match="decode_blocks: block 1's qkv projection must be 384 -> 768"):
        call(position=1, lins=swapped)
    # Every block is checked before the first runs: a bad last block leaves block 0's cache as it was.
    k0, lens0 = caches[0].k.clone(), caches[0].seqlens.clone()
    with pytest.raises(RuntimeError, match=r"decode_blocks: block 1's cache_seqlens\[0\] = 3 but position is 1"):
        call(position=1, lens=torch.full((2,), 3, dtype=torch.int32))
    assert torch.equal(caches[0].k, k0) and torch.equal(caches[0].seqlens, lens0)


def _apart(qkv, hq=4, hk=2, d=96):
    """q, k and v of a fused qkv QuantLinear as three weights (row slices), as a transformers
    attention holds them."""
    cuts = (0, hq * d, (hq + hk) * d, (hq + 2 * hk) * d)
    return [SimpleNamespace(qweight=qkv.qweight[a:b], scales=qkv.scales[a:b], bits=qkv.bits, group_size=qkv.group_size,
                            zeros=None if qkv.zeros is None else qkv.zeros[a:b]) for a, b in zip(cuts, cuts[1:])]


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["int8", "int4-g64-asym-bf16"])
def test_q_k_v_apart_give_the_same_bits(fmt):
    """Seven weights per block (q, k, v apart) decode as five (qkv fused)."""
    model = llama(**FORMATS[fmt])
    blocks = model.blocks[:2]
    x = torch.randn(4, 3, 1, 384, generator=torch.Generator().manual_seed(0))
    runs = []
    for apart in (False, True):
        caches = [blk.attn.new_cache(3, 8) for blk in blocks]
        lins = []
        for blk in blocks:
            lins += (_apart(blk.attn.qkv) if apart else [blk.attn.qkv])
            lins += [blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj]
        outs = []
        for position in range(4):
            outs += torch.ops.fastlm_C.decode_blocks(
                x[position], None, [blk.norm1.weight for blk in blocks], [blk.norm2.weight for blk in blocks],
                1e-5, [m.qweight for m in lins], [m.scales for m in lins], [m.zeros for m in lins], [None] * len(lins),
                [m.bits for m in lins], [m.group_size for m in lins], [c.k for c in caches], [c.v for c in caches],
                [c.seqlens for c in caches], position, 4, 2, 10000.0, 96 ** -0.5, [], [], 0, None, None, None)
        runs.append((outs, caches))
    # Not to the bit: which rows a matmul's kernels take together (and so the order of their
    # float sums) depends on its number of rows.
    (o1, c1), (o2, c2) = runs
    for a, b in zip(o1, o2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(c1, c2, strict=True):
        torch.testing.assert_close(a.k, b.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.v, b.v, rtol=1e-5, atol=1e-5)


def test_q_k_v_apart_are_checked():
    model = llama()
    blk = model.blocks[0]
    cache = blk.attn.new_cache(1, 4)
    q, k, v = _apart(blk.attn.qkv)
    lins = [q, v, k, blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj]
    lins[1] = SimpleNamespace(**{**vars(v), "qweight": v.qweight[:96], "scales": v.scales[:96]})
    with pytest.raises(RuntimeError, match="decode_blocks: block 0's k projection must be 384 -> 192"):
        torch.ops.fastlm_C.decode_blocks(
            torch.randn(1, 1, 384), None, [blk.norm1.weight], [blk.norm2.weight], 1e-5, [m.qweight for m in lins],
            [m.scales for m in lins], [m.zeros for m in lins], [None] * len(lins), [m.bits for m in lins],
            [m.group_size for m in lins], [cache.k], [cache.v], [cache.seqlens], 0, 4, 2, 10000.0, 96 ** -0.5, [], [],
            0, None, None, None)
    with pytest.raises(RuntimeError, match="or 7 \\(q, k, v, proj, gate, up, down\\)"):
        torch.ops.fastlm_C.decode_blocks(
            torch.randn(1, 1, 384), None, [blk.norm1.weight], [blk.norm2.weight], 1e-5, [m.qweight for m in lins[:6]],
            [m.scales for m in lins[:6]], [m.zeros for m in lins[:6]], [None] * 6, [m.bits for m in lins[:6]],
            [m.group_size for m in lins[:6]], [cache.k], [cache.v], [cache.seqlens], 0, 4, 2, 10000.0, 96 ** -0.5, [],
            [], 0, None, None, None)


@torch.no_grad()
def test_a_rotary_table_given_replaces_theta():
    """cos and sin given (a transformers model's own rotary, any scaling) are the angles used:
    the table of theta' decodes as theta' does, whatever theta says."""
    model = llama()
    blk = model.blocks[0]
    lins = [blk.attn.qkv, blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj]
    x = torch.randn(2, 1, 384)

    def run(theta, cos=None, sin=None, position=3):
        cache = blk.attn.new_cache(2, 8)
        cache.k[:, :, :position], cache.v[:, :, :position] = torch.ones(2, 2, 2, position, 96).unbind(0)
        cache.seqlens.fill_(position)
        out = torch.ops.fastlm_C.decode_blocks(
            x, None, [blk.norm1.weight], [blk.norm2.weight], 1e-5, [m.qweight for m in lins],
            [m.scales for m in lins], [m.zeros for m in lins], [None] * 5, [m.bits for m in lins],
            [m.group_size for m in lins], [cache.k], [cache.v], [cache.seqlens], position, 4, 2, theta, 96 ** -0.5,
            [], [], 0, cos, sin, None)
        return out[0], cache.k[:, :, position]

    inv = 500000.0 ** (-torch.arange(0, 96, 2, dtype=torch.float64) / 96)
    angles = torch.cat([3 * inv, 3 * inv])[None, None]
    cos, sin = angles.cos().float(), angles.sin().float()
    want_out, want_k = run(500000.0)
    got_out, got_k = run(10000.0, cos, sin)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(run(10000.0)[1], want_k, rtol=1e-3, atol=1e-4)
    with pytest.raises(RuntimeError, match="decode_blocks: cos and sin must be given together"):
        run(10000.0, cos, None)
    with pytest.raises(RuntimeError, match="decode_blocks: cos and sin must be contiguous float32 CPU tensors"):
        run(10000.0, cos.double(), sin.double())
    with pytest.raises(RuntimeError, match="decode_blocks: cos and sin must be contiguous float32 CPU tensors"):
        run(10000.0, cos.expand(3, 1, 96).contiguous(), sin.expand(3, 1, 96).contiguous())


def test_a_bias_of_the_wrong_shape_is_named():
    model = llama()
    blk = model.blocks[0]
    lins = [blk.attn.qkv, blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj]
    cache = blk.attn.new_cache(1, 4)
    with pytest.raises(RuntimeError, match=r"decode_blocks: block 0's up bias must be a contiguous float32 CPU tensor "
                                           r"of shape \(1024\)"):
        torch.ops.fastlm_C.decode_blocks(
            torch.randn(1, 1, 384), None, [blk.norm1.weight], [blk.norm2.weight], 1e-5, [m.qweight for m in lins],
            [m.scales for m in lins], [m.zeros for m in lins], [None, None, None, torch.zeros(384), None],
            [m.bits for m in lins], [m.group_size for m in lins], [cache.k], [cache.v], [cache.seqlens], 0, 4, 2,
            10000.0, 96 ** -0.5, [], [], 0, None, None, None)


def test_q_k_norms_and_head_dim_are_checked():
    model = llama()
    blk = model.blocks[0]
    lins = [blk.attn.qkv, blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj]
    cache = blk.attn.new_cache(1, 4)

    def call(q_norms, k_norms, head_dim=0):
        return torch.ops.fastlm_C.decode_blocks(
            torch.randn(1, 1, 384), None, [blk.norm1.weight], [blk.norm2.weight], 1e-5, [m.qweight for m in lins],
            [m.scales for m in lins], [m.zeros for m in lins], [None] * 5, [m.bits for m in lins],
            [m.group_size for m in lins], [cache.k], [cache.v], [cache.seqlens], 0, 4, 2, 10000.0, 96 ** -0.5,
            q_norms, k_norms, head_dim, None, None, None)

    with pytest.raises(RuntimeError, match="decode_blocks: q_norms and k_norms must both be empty or hold one entry"):
        call([torch.ones(96)], [])
    with pytest.raises(RuntimeError, match=r"decode_blocks: block 0's q and k norm weights must be float32 CPU "
                                           r"tensors of shape \(96\)"):
        call([torch.ones(96)], [torch.ones(48)])
    # head_dim 48 makes the qkv projection's 768 outputs the wrong count: (4 + 2 x 2) x 48 = 384
    with pytest.raises(RuntimeError, match="decode_blocks: block 0's qkv projection must be 384 -> 384"):
        call([], [], head_dim=48)
    assert cache.seqlens.tolist() == [0]
    out, _ = call([torch.ones(96)], [torch.ones(96)])
    assert out.shape == (1, 1, 384) and cache.seqlens.tolist() == [1]


def test_cache_starts_are_checked():
    model = llama()
    blk = model.blocks[0]
    lins = [blk.attn.qkv, blk.attn.proj, blk.mlp.gate_proj, blk.mlp.up_proj, blk.mlp.down_proj]
    cache = blk.attn.new_cache(2, 4)

    def call(starts):
        return torch.ops.fastlm_C.decode_blocks(
            torch.randn(2, 1, 384), None, [blk.norm1.weight], [blk.norm2.weight], 1e-5, [m.qweight for m in lins],
            [m.scales for m in lins], [m.zeros for m in lins], [None] * 5, [m.bits for m in lins],
            [m.group_size for m in lins], [cache.k], [cache.v], [cache.seqlens], 0, 4, 2, 10000.0, 96 ** -0.5,
            [], [], 0, None, None, starts)

    with pytest.raises(RuntimeError, match=r"decode_blocks: cache_starts\[1\] = 1 must lie in \[0, 0\]"):
        call(torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"decode_blocks: cache_starts must be a contiguous int32 CPU tensor"):
        call(torch.tensor([0, 0]))
    assert cache.seqlens.tolist() == [0, 0]
    call(torch.zeros(2, dtype=torch.int32))
    assert cache.seqlens.tolist() == [1, 1]
