"""The CPU's integer quantized linear (quant_linear(act_quant=True), torch.ops.fastlm.quant_matmul_dot):
against a float64 matmul of the dequantized weight and the input as the kernel quantizes it
(fastlm.reference.act_quant), on every instruction path this CPU has; the extra error against
the exact product within its bound; 16-bit scales on every backend; QuantLinear's cached weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backends, ops, quant
from fastlm import reference as ref
from fastlm.nn import QuantLinear

pytestmark = pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no CPU extension")

ISAS = {"avx2": 1, "avx512_vnni": 2, "avx_vnni": 3}
N = 67
# (bits, K, group_size, symmetric, scale dtype)
WEIGHTS = [(8, 96, None, True, torch.float32), (8, 512, None, True, torch.bfloat16)]
WEIGHTS += [(4, k, g, sym, torch.float32) for k in (96, 256, 384) for g in (32, 64, 128) if k % g == 0
            for sym in (True, False)]
WEIGHTS += [(4, 256, 32, True, torch.bfloat16), (4, 256, 128, False, torch.float16)]
WEIGHTS += [(4, 160, 32, sym, torch.float32) for sym in (True, False)]  # K / 32 = 5: a run of 4 blocks and one
MS = (1, 2, 3, 4, 5, 8, 12, 17, 25, 64)  # 512-bit: 12 a padded group of 16, 25 one of 16 and one of 8


def isas() -> list[str]:
    backends.extension_error()  # loads the extension
    have = []
    for name, code in ISAS.items():
        try:
            torch.ops.fastlm_C.quant_dot_isa(code)
            have.append(name)
        except RuntimeError:
            pass
    torch.ops.fastlm_C.quant_dot_isa(0)
    return have


@pytest.fixture(params=["avx2", "avx512_vnni", "avx_vnni"])
def isa(request):
    if request.param not in isas():
        pytest.skip(f"this CPU has no {request.param}")
    torch.ops.fastlm_C.quant_dot_isa(ISAS[request.param])
    yield request.param
    torch.ops.fastlm_C.quant_dot_isa(0)


def wid(w):
    bits, k, g, sym, sd = w
    kind = "int8" if bits == 8 else f"int4-g{g}-{'sym' if sym else 'asym'}"
    return f"{kind}-K{k}-{str(sd).removeprefix('torch.')}"


def make_weight(n, k, bits, g, sym, sd=torch.float32):
    w = torch.randn(n, k) * (1 + torch.rand(n, 1))
    if not sym:
        w = w + 0.5 * torch.randn(n, 1)
    return quant.quantize(w, bits, g or 128, sym, sd)


@pytest.mark.parametrize("w", WEIGHTS, ids=wid)
@pytest.mark.parametrize("m", MS)
def test_against_float64(isa, w, m):
    bits, k, g, sym, sd = w
    qw = make_weight(N, k, bits, g, sym, sd)
    wd = quant.dequantize(qw, torch.float64)
    for dt in (torch.float32, torch.bfloat16):
        x = (torch.randn(m, k) * (1 + 3 * torch.rand(m, k).pow(8))).to(dt)  # a few larger values
        b = torch.randn(N).to(dt)
        y = ops.quant_linear(x, qw, b, backend="cpu", act_quant=True)
        assert y.shape == (m, N) and y.dtype == dt
        xq = ref.act_quant(x)
        want = ref.quant_linear(xq, wd, b)
        scale = ref.quant_linear(xq.abs(), wd.abs(), b.abs())
        tol = 4e-6 if dt == torch.float32 else 2.0 ** -8  # the float32 sums, or the output's rounding
        err = ref.error(y, want, scale)
        assert err <= tol, f"{isa} {dt}: error {err:.3g} of the sum of |terms|"
        # Against the exact product: within what rounding x to half a block step can add.
        exact = ref.quant_linear(x, wd, b)
        d = x.float().reshape(m, k // 32, 32).abs().amax(-1) / 127  # (m, blocks)
        slack = (d.double().repeat_interleave(32, -1) / 2) @ wd.abs().T
        if dt == torch.float32:
            assert bool(((y.double() - exact).abs() <= slack * (1 + 1e-5) + 4e-6 * scale).all())


def test_matches_reference_where_float_path_is_exact(isa):
    # x already on the int8 grid of every block: quantizing it changes nothing, so the integer
    # path must give the exact product (to float32 rounding).
    k = 256
    qw = make_weight(N, k, 4, 32, True)
    q = torch.randint(-127, 128, (3, k)).float()
    q[:, ::32] = 127  # each block's absmax is 127: d = 1
    y = ops.quant_linear(q, qw, backend="cpu", act_quant=True)
    yf = ops.quant_linear(q, qw, backend="cpu")
    assert ref.error(y, yf.double(), ref.quant_linear(q.abs(), quant.dequantize(qw, torch.float64).abs())) <= 4e-6


@pytest.mark.parametrize("m", [3, 9, 13, 17])  # x taken 8 or 16 rows at once, 13 and 12: a padded group of 16
def test_non_finite(isa, m):
    k = 128
    qw = make_weight(N, k, 4, 32, True)
    x = torch.randn(m, k)
    x[0, 40] = float("inf")
    x[1, 5] = float("nan")
    y = ops.quant_linear(x, qw, backend="cpu", act_quant=True)
    assert bool(y[:2].isnan().all()) and bool(y[2:].isfinite().all())
    qw.scales[7, 1] = float("nan")
    y = ops.quant_linear(torch.randn(m - 1, k), qw, backend="cpu", act_quant=True)
    assert bool(y[:, 7].isnan().all()) and int(y.isnan().sum()) == m - 1


def test_zero_rows_and_k_off_the_block_take_the_float_path():
    qw = make_weight(N, 64, 8, None, True)
    assert ops.quant_linear(torch.zeros(2, 64), qw, backend="cpu", act_quant=True).abs().max() == 0
    x = torch.randn(3, 48)  # K not a multiple of 32: the float path
    qw = make_weight(N, 48, 8, None, True)
    assert torch.equal(ops.quant_linear(x, qw, backend="cpu", act_quant=True), ops.quant_linear(x, qw, backend="cpu"))


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True)], ids=["int4-sym", "int4-asym", "int8"])
def test_large_m(isa, bits, sym):
    # Past DOT_MAX_M the integer path stays where the kernels take many rows of x at once (int4
    # everywhere, int8 on the 512-bit kernels); int8 on the 256-bit kernels takes the float path.
    k, m = 256, ops.quant_matmul.DOT_MAX_M + 37  # 16-row groups, then 8, then 5 rows
    qw = make_weight(N, k, bits, 32 if bits == 4 else None, sym)
    x = torch.randn(m, k)
    y = ops.quant_linear(x, qw, backend="cpu", act_quant=True)
    if bits == 8 and isa != "avx512_vnni":
        assert torch.equal(y, ops.quant_linear(x, qw, backend="cpu"))
        return
    wd = quant.dequantize(qw, torch.float64)
    xq = ref.act_quant(x)
    assert ref.error(y, ref.quant_linear(xq, wd), ref.quant_linear(xq.abs(), wd.abs())) <= 4e-6


def test_gradient():
    qw = make_weight(N, 128, 4, 64, False)
    x = torch.randn(5, 128, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    y = ops.quant_linear(x, qw, b, backend="cpu", act_quant=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    wd = quant.dequantize(qw, torch.float64)
    assert ref.error(x.grad, dy.double() @ wd) <= 1e-5
    assert ref.error(b.grad, dy.double().sum(0)) <= 1e-5


def test_raw_op_errors():
    backends.extension_error()
    op = torch.ops.fastlm_C.quant_matmul_dot
    qw = make_weight(8, 64, 4, 32, True)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="K"):
        op(torch.randn(2, 48), torch.zeros(8, 24, dtype=torch.uint8), torch.ones(8, 3), None, None, 4, 16)
    with pytest.raises(RuntimeError, match="group_size"):
        op(x, qw.qweight, torch.ones(8, 4), None, None, 4, 16)
    with pytest.raises(RuntimeError, match="scales"):
        op(x, qw.qweight, qw.scales.double(), None, None, 4, 32)
    with pytest.raises(RuntimeError, match="zeros"):
        op(x, qw.qweight, qw.scales, qw.scales.half(), None, 4, 32)
    with pytest.raises(RuntimeError, match="qweight"):
        op(x, qw.qweight.view(torch.int8), qw.scales, None, None, 4, 32)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, qw.qweight, qw.scales, None, torch.ones(7), 4, 32)
    with pytest.raises(RuntimeError, match="force"):
        torch.ops.fastlm_C.quant_dot_isa(9)
    assert torch.ops.fastlm_C.quant_dot_isa(-1) in ISAS


# --- 16-bit scales on every backend ---------------------------------------------------------------


@pytest.mark.parametrize("sd", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_16bit_scales(backend, device, sd, sym):
    qw = make_weight(N, 128, 4, 32, sym, sd).to(device)
    assert qw.scales.dtype == sd and (qw.zeros is None or qw.zeros.dtype == sd)
    assert qw.nbytes() == N * 64 + N * 4 * 2 * (1 if sym else 2)  # 4.5 bits a weight, symmetric
    x = torch.randn(3, 128, device=device)
    y = ops.quant_linear(x, qw, backend=backend)
    wd = quant.dequantize(qw.to("cpu"), torch.float64)
    want = ref.quant_linear(x.cpu(), wd)
    assert ref.error(y.cpu(), want, ref.quant_linear(x.cpu().abs(), wd.abs())) <= 2e-6


@pytest.mark.parametrize("sd", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_scales_round_trip(sd):
    w = torch.randn(N, 256)
    qw = quant.quantize(w, 4, 32, True, sd)
    s = qw.scales.float().repeat_interleave(32, -1)
    assert bool(((w - quant.dequantize(qw)).abs() <= s * 0.5 * (1 + 1e-5) + 1e-30).all())
    with pytest.raises(ValueError, match="range"):
        quant.quantize(torch.full((2, 32), 1e-9), 4, 32, True, torch.float16)
    with pytest.raises(ValueError, match="scale_dtype"):
        quant.quantize(w, 4, 32, True, torch.int8)


# --- QuantLinear ------------------------------------------------------------------------------


def test_quant_linear_caches_its_weight():
    lin = torch.nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, bits=4, group_size=32, act_quant=True)
    w = q.weight
    assert q.weight is w and w.qweight is q.qweight
    x = torch.randn(2, 64)
    y = q(x)
    assert q.weight is w
    assert torch.equal(y, ops.quant_linear(x, w, q.bias, backend=backends.choose("t", x.device), act_quant=True))
    q.to(torch.device("cpu"))  # same tensors: the cache stays
    q.scales = q.scales * 2  # a new tensor: rebuilt, and used
    assert q.weight is not w and q.weight.scales is q.scales
    assert not torch.equal(q(x), y)
    assert "act_quant" in repr(q)


def test_quantize_act_quant_and_scale_dtype():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    x = torch.randn(4, 64)
    want = model(x)
    fastlm.quantize_(model, bits=4, group_size=32, act_quant=True, scale_dtype=torch.bfloat16)
    assert all(m.act_quant and m.scales.dtype == torch.bfloat16 for m in model if isinstance(m, QuantLinear))
    got = model(x)
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_quantized_model_generates():
    from fastlm.model import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                            norm="rmsnorm", pos="rope", bias=False)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 97, (2, 5))
    want = model(ids)[0]
    fastlm.quantize_(model, bits=8, act_quant=True)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32
    got = model(ids, backend="cpu")[0]
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    out = model.generate(ids, 6, temperature=0.0, backend="cpu")
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
