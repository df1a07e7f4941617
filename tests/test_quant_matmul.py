"""Weight-only quantized linear: the format (fastlm.quant), quant_linear on every backend against a
float64 matmul with the dequantized weight, QuantLinear, quantize_."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _env import INTERPRET

import fastlm
from fastlm import backends, ops, quant
from fastlm import reference as ref
from fastlm.nn import QuantLinear
from fastlm.ops.quant_matmul import DTYPES as QM_DTYPES
from fastlm.quant import QuantizedWeight

N = 67  # a multiple of no tile size
# (bits, K, group_size, symmetric); group_size None for int8 (per output channel).
WEIGHTS = [(8, 64, None, True), (8, 256, None, True)]
WEIGHTS += [(4, k, g, sym) for k in (64, 256) for g in (32, 64, 128) if k % g == 0 for sym in (True, False)]
MS = (1, 3, 8, 17, 33)
if INTERPRET:  # every program is interpreted in Python: fewer and smaller cases
    WEIGHTS = [w for w in WEIGHTS if w[1] == 64] + [(4, 256, 128, False)]
    MS = (1, 3, 17)


def wid(w):
    bits, k, g, sym = w
    return f"int8-K{k}" if bits == 8 else f"int4-K{k}-g{g}-{'sym' if sym else 'asym'}"


def dtypes(backend: str, device: str) -> list[torch.dtype]:
    # bf16 dots are wrong in the Triton interpreter (a known upstream bug): fp16 stands in there.
    low = torch.float16 if INTERPRET else torch.bfloat16
    return [d for d in (torch.float32, low) if d in QM_DTYPES[backend]]


def make_weight(n, k, bits, g, sym, device="cpu"):
    w = torch.randn(n, k) * (1 + torch.rand(n, 1))  # rows of different scale
    if not sym:
        w = w + 0.5 * torch.randn(n, 1)  # off-centre rows need the zero point
    return quant.quantize(w, bits, g or 128, sym).to(device)


def bound(x, wd, b):
    """Per element, the sum of |terms| of x @ W^T + b: the scale that rounding errors follow."""
    return x.abs() @ wd.abs().T + (0 if b is None else b.abs())


def rel_err(y, want, scale):
    return ref.error(y.cpu(), want, scale)


# --- forward and backward against float64 ---------------------------------------------------------


@pytest.mark.parametrize("w", WEIGHTS, ids=wid)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward(backend, device, w, m, has_bias):
    bits, k, g, sym = w
    qw = make_weight(N, k, bits, g, sym, device)
    wd = quant.dequantize(qw.to("cpu"), torch.float64)
    for dt in dtypes(backend, device):
        x = torch.randn(m, k, dtype=torch.float64).to(dt).to(device).requires_grad_()
        b = torch.randn(N, dtype=torch.float64).to(dt).to(device).requires_grad_() if has_bias else None
        y = ops.quant_linear(x, qw, b, backend=backend)
        assert y.shape == (m, N) and y.dtype == dt and y.device == x.device
        xd = x.detach().cpu().double().requires_grad_()
        bd = None if b is None else b.detach().cpu().double().requires_grad_()
        want, scale = ref.quant_linear(xd, wd, bd), bound(xd.detach(), wd, None if bd is None else bd.detach())
        if dt == torch.float32:
            err = rel_err(y, want, scale)
            assert err <= 2e-6, f"{dt}: error {err:.3g} of the sum of |terms|"
        else:
            # At most about twice torch's own error in this dtype (weights rounded to it), or the
            # rounding of the output.
            yt = F.linear(x.detach().cpu(), quant.dequantize(qw.to("cpu"), dt), None if b is None else b.detach().cpu())
            ref.assert_within_twice_torch(y, yt, want, floor=2.0 ** -8, name=str(dt), scale=scale)

        dy = torch.randn(m, N, dtype=torch.float64)
        y.backward(dy.to(dt).to(device))
        dyd = dy.to(dt).double()
        dx_ref, *db_ref = torch.autograd.grad(want, [xd] + ([] if bd is None else [bd]), dyd)
        tol = 2e-6 if dt == torch.float32 else 2.0 ** -6
        assert x.grad.dtype == dt
        assert rel_err(x.grad, dx_ref, dyd.abs() @ wd.abs()) <= tol, f"{dt}: dx"
        if b is not None:
            assert rel_err(b.grad, db_ref[0], dyd.abs().sum(0)) <= tol, f"{dt}: dbias"


def test_leading_dims_and_no_grad_needed(backend, device):
    qw = make_weight(N, 64, 4, 32, True, device)
    x = torch.randn(2, 3, 64, device=device)
    y = ops.quant_linear(x, qw, backend=backend)
    assert y.shape == (2, 3, N)
    wd = quant.dequantize(qw.to("cpu"), torch.float64)
    assert rel_err(y, ref.quant_linear(x.cpu(), wd), bound(x.cpu().double(), wd, None)) <= 2e-6
    # Rows of zero length give an empty result of the right shape.
    assert ops.quant_linear(x[:0], qw, backend=backend).shape == (0, 3, N)


def test_bias_only_gradient(backend, device):
    qw = make_weight(N, 64, 8, None, True, device)
    x = torch.randn(4, 64, device=device)
    b = torch.zeros(N, device=device, requires_grad=True)
    ops.quant_linear(x, qw, b, backend=backend).sum().backward()
    torch.testing.assert_close(b.grad.cpu(), torch.full((N,), 4.0))


def test_cpu_kernel_general_layouts():
    """The C++ kernel also takes what quantize() does not make (K not a multiple of 16, any
    group size), through its tiled path; checked against the float64 reference directly."""
    if backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip(backends.why_unavailable("cpu", "cpu"))
    for m in (1, 5, 12):
        for bits, k, g in ((8, 100, 100), (8, 40, 40), (4, 24, 8), (4, 40, 20), (4, 36, 36)):
            n = 13
            if bits == 8:
                q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
                qi, z = q.double(), None
            else:
                qi = torch.randint(0, 16, (n, k))
                q = (qi[:, 0::2] | (qi[:, 1::2] << 4)).to(torch.uint8)
                qi, z = qi.double(), torch.rand(n, k // g) * 15
            s = torch.rand(n, k // g) + 0.5
            zz = z.double() if z is not None else torch.zeros_like(s, dtype=torch.float64)
            wd = (qi - zz.repeat_interleave(g, 1)) * s.double().repeat_interleave(g, 1)
            x = torch.randn(m, k)
            b = torch.randn(n)
            y = torch.ops.fastlm_C.quant_matmul(x, q, s, z, b, bits, g)
            want = ref.quant_linear(x, wd, b)
            assert rel_err(y, want, bound(x.double(), wd, b.double())) <= 2e-6, (m, bits, k, g)


# --- the format -------------------------------------------------------------------------------


@pytest.mark.parametrize("w", WEIGHTS, ids=wid)
def test_quantize_round_trip(w):
    bits, k, g, sym = w
    weight = torch.randn(N, k) * torch.rand(N, 1) + (0 if sym else 0.3)
    weight[0] = 0  # an all-zero row: scale 1, exact zeros back
    qw = quant.quantize(weight, bits, g or 128, sym)
    gs = k if bits == 8 else g
    assert qw.group_size == gs and qw.shape == (N, k) and qw.bits == bits
    assert qw.scales.shape == (N, k // gs) and qw.scales.dtype == torch.float32
    assert (qw.zeros is None) == sym
    dq = quant.dequantize(qw)
    assert dq.shape == (N, k) and dq.dtype == torch.float32
    assert torch.equal(dq[0], torch.zeros(k))
    half = qw.scales.repeat_interleave(gs, 1) / 2
    assert bool(((weight - dq).abs() <= half * (1 + 1e-5) + 1e-30).all())
    q = quant.unpack(qw)
    lo, hi = ((-127, 127) if bits == 8 else (0, 15))
    assert int(q.min()) >= lo and int(q.max()) <= hi
    # Quantizing the dequantized weight again gives back the same values.
    again = quant.quantize(dq, bits, g or 128, sym)
    torch.testing.assert_close(quant.dequantize(again), dq, rtol=1e-6, atol=1e-7)


def test_int4_packing_layout():
    """Element k of row n in byte k // 2: the low nibble for even k, the high one for odd k."""
    q = (torch.arange(64) * 7).remainder(15).add(1).reshape(1, 64)  # 1..15: symmetric quantize keeps them
    packed = torch.tensor([[(q[0, 2 * j] | (q[0, 2 * j + 1] << 4)).item() for j in range(32)]], dtype=torch.uint8)
    qw = QuantizedWeight(packed, torch.ones(1, 2), None, 4, 32, (1, 64))
    torch.testing.assert_close(quant.dequantize(qw), (q - 8).float())
    assert torch.equal(quant.quantize(quant.dequantize(qw), 4, 32).qweight, packed)
    zeros = torch.tensor([[3.0, 5.0]])
    qz = QuantizedWeight(packed, torch.tensor([[0.5, 2.0]]), zeros, 4, 32, (1, 64))
    want = (q.float() - zeros.repeat_interleave(32, 1)) * torch.tensor([[0.5, 2.0]]).repeat_interleave(32, 1)
    torch.testing.assert_close(quant.dequantize(qz), want)


def test_int8_is_per_channel_symmetric():
    w = torch.randn(5, 48)
    qw = quant.quantize(w, 8, group_size=16)  # group_size does not apply to int8
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (5, 1) and qw.group_size == 48
    torch.testing.assert_close(qw.scales[:, 0], w.abs().amax(1) / 127)


# --- bad input --------------------------------------------------------------------------------


def test_quantize_errors():
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(torch.randn(4, 64), bits=3)
    with pytest.raises(ValueError, match="group_size 64 must divide in_features 96"):
        quant.quantize(torch.randn(4, 96), bits=4, group_size=64)
    with pytest.raises(ValueError, match="even"):
        quant.quantize(torch.randn(4, 63), bits=4, group_size=32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant.quantize(torch.randn(4, 64), bits=4, group_size=16)
    with pytest.raises(TypeError, match="floating-point"):
        quant.quantize(torch.ones(4, 64, dtype=torch.int32), bits=8)
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize(torch.randn(64), bits=8)
    with pytest.raises(ValueError, match="asymmetric"):
        quant.quantize(torch.randn(4, 64), bits=8, symmetric=False)


def test_quant_linear_errors(backend, device):
    qw = make_weight(N, 64, 4, 32, True, device)
    x = torch.randn(3, 64, device=device)
    with pytest.raises(ValueError, match="input's last dim must be in_features = 64"):
        ops.quant_linear(torch.randn(3, 65, device=device), qw, backend=backend)
    with pytest.raises(TypeError, match="input must be a floating-point"):
        ops.quant_linear(torch.ones(3, 64, dtype=torch.int64, device=device), qw, backend=backend)
    with pytest.raises(TypeError, match="weight must be a fastlm.quant.QuantizedWeight"):
        ops.quant_linear(x, torch.randn(N, 64, device=device), backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.quant_linear(x, qw, torch.randn(N + 1, device=device), backend=backend)
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.quant_linear(x, qw.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.quant_linear(x, qw, torch.randn(N, device="meta"), backend=backend)
    broken = QuantizedWeight(qw.qweight, qw.scales[:, :1].contiguous(), None, 4, 32, (N, 64))
    with pytest.raises(ValueError, match="scales must be float32, bfloat16 or float16 of shape"):
        ops.quant_linear(x, broken, backend=backend)
    if torch.float64 not in QM_DTYPES[backend]:
        with pytest.raises(TypeError, match=f"backend '{backend}' supports input dtypes"):
            ops.quant_linear(x.double(), qw, backend=backend)


# --- the module -------------------------------------------------------------------------------


def test_quant_linear_module(backend, device):
    lin = torch.nn.Linear(128, N).to(device)
    for bits, g, sym in ((8, 128, True), (4, 64, True), (4, 32, False)):
        q = QuantLinear.from_linear(lin, bits=bits, group_size=g, symmetric=sym)
        assert isinstance(q.bias, torch.nn.Parameter) and q.bias.requires_grad
        assert ("zeros" in q.state_dict()) == (not sym)
        assert f"int{bits}" in repr(q)
        x = torch.randn(5, 128, device=device)
        with fastlm.use_backend(backend):
            y = q(x)
        xd, wd, bd = x.cpu().double(), q.dequantize(torch.float64).cpu(), q.bias.detach().cpu().double()
        assert rel_err(y, ref.quant_linear(xd, wd, bd), bound(xd, wd, bd)) <= 2e-6
        # Close to the float layer: the quantization error only.
        torch.testing.assert_close(y, lin(x), rtol=0.1, atol=0.1 if bits == 4 else 0.01)


def test_quant_linear_constructor():
    q = QuantLinear(64, 32, bias=False, bits=4, group_size=32, symmetric=False)
    assert q.bias is None and q.qweight.shape == (32, 32) and q.zeros.shape == (32, 2)
    assert q(torch.randn(2, 64)).shape == (2, 32)
    m = QuantLinear(64, 32, device="meta")
    assert m.qweight.device.type == "meta" and m.qweight.dtype == torch.int8
    with pytest.raises(ValueError, match="group_size 128 must divide in_features 96"):
        QuantLinear(96, 8, bits=4, group_size=128)


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    for bits, g, sym in ((8, 128, True), (4, 32, False)):
        src = QuantLinear.from_linear(torch.nn.Linear(64, 24), bits=bits, group_size=g, symmetric=sym)
        path = tmp_path / f"q{bits}.safetensors"
        st.save_file(src.state_dict(), str(path))
        dst = QuantLinear(64, 24, bits=bits, group_size=g, symmetric=sym)
        dst.load_state_dict(st.load_file(str(path)))
        for key, t in src.state_dict().items():
            assert torch.equal(dst.state_dict()[key], t), key
        x = torch.randn(3, 64)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_compile_fullgraph(backend, device):
    q = QuantLinear.from_linear(torch.nn.Linear(64, N), bits=4, group_size=32).to(device)
    x = torch.randn(3, 64, device=device)

    def fwd(x):
        with fastlm.use_backend(backend):
            return q(x)

    torch._dynamo.reset()
    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor")
    torch.testing.assert_close(compiled(x), fwd(x), rtol=1e-5, atol=1e-5)


# --- quantize_ --------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 64)
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)
        self.head = torch.nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def test_quantize_model_in_place():
    model = TinyLM()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids)
    out = fastlm.quantize_(model, bits=4, group_size=32)
    assert out is model
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    assert type(model.head) is torch.nn.Linear and model.head.weight is model.emb.weight  # tie kept
    after = model(ids)
    assert ((after - before).norm() / before.norm()).item() < 0.05  # int4 noise, no more
    h = model.emb(ids)
    up = F.linear(h, model.up.dequantize(), model.up.bias)
    want = F.linear(h + F.linear(torch.relu(up), model.down.dequantize(), model.down.bias), model.emb.weight)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)
    # skip, and quantizing a tied head on request.
    m2 = fastlm.quantize_(TinyLM(), bits=8, skip=lambda name, mod: name == "up", quantize_tied=True)
    assert type(m2.up) is torch.nn.Linear and isinstance(m2.down, QuantLinear) and isinstance(m2.head, QuantLinear)
    with pytest.raises(ValueError, match="layer 'up'.*skip="):
        fastlm.quantize_(TinyLM(), bits=4, group_size=128)


@pytest.mark.parametrize("bits, sym", [(8, True), (4, True), (4, False)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_give_nan_outputs(backend, device, bits, sym, bad):
    """A NaN (or inf) weight must not quantize to finite numbers (a NaN scale used to become 1):
    the outputs computed from its group are NaN, the others exact as usual."""
    w = torch.randn(6, 64)
    w[2, 5] = bad
    qw = quant.quantize(w, bits, 32, sym)
    assert not bool(quant.dequantize(qw)[2, :32].isfinite().any())
    assert bool(quant.dequantize(qw)[[0, 1, 3, 4, 5]].isfinite().all())
    x = torch.randn(3, 64, device=device)
    y = ops.quant_linear(x, qw.to(device), backend=backend).cpu()
    assert bool(y[:, 2].isnan().all()) and bool(y[:, [0, 1, 3, 4, 5]].isfinite().all())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_a_weight_of_no_rows(backend, device, bits):
    """nn.Linear(64, 0) exists; its weight quantizes (int4 used to fail reshaping) and multiplies
    to an empty output like torch's."""
    qw = quant.quantize(torch.randn(0, 64), bits, 32)
    assert qw.scales.shape == (0, 64 // qw.group_size)
    y = ops.quant_linear(torch.randn(3, 64, device=device), qw.to(device), backend=backend)
    assert y.shape == (3, 0)


def test_quantize_without_columns_names_weight():
    with pytest.raises(ValueError, match="weight has no columns"):
        quant.quantize(torch.randn(4, 0), bits=8)


def test_quantize_tied_output_layer_of_the_transformer():
    """fastlm's Transformer applies its embedding as the output layer; quantize_tied gives it a
    quantized copy there (logits and loss through it), and the embedding lookup stays float."""
    from fastlm.model import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, d_model=64, pos="rope", bias=False)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, 96, (2, 6))
    want, _ = model(ids)
    fastlm.quantize_(model, bits=8)
    assert model.lm_head is None  # tied: left alone without quantize_tied
    fastlm.quantize_(model, bits=8, quantize_tied=True)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.wte.weight, torch.nn.Parameter)
    got, loss = model(ids, ids)
    y = model.hidden(ids)
    torch.testing.assert_close(got, F.linear(y, model.lm_head.dequantize()), rtol=1e-4, atol=1e-4)
    assert ((got - want).norm() / want.norm()).item() < 0.02  # int8 noise, no more
    torch.testing.assert_close(loss, F.cross_entropy(got.flatten(0, 1), ids.reshape(-1)))
    out = model.generate(ids, 3, temperature=0.0)
    assert out.shape == (2, 9)
    with pytest.raises(ValueError, match="tied output layer"):
        fastlm.quantize_(Transformer(TransformerConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2,
                                                       d_model=48)), bits=4, group_size=32, quantize_tied=True,
                        skip=lambda name, mod: True)


@pytest.mark.parametrize("w", [(8, 200, None, True), (4, 256, 32, False), (4, 256, 128, True)], ids=wid)
@pytest.mark.parametrize("n", [67, 8200], ids=["one-slab", "two-slabs"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_cpu_blas_path_matches_float64(w, n, has_bias):
    """From M = 256 the CPU float path multiplies dequantized slabs of W (8 MiB of float32 each)
    with torch's BLAS, writing each slab's columns of y in place."""
    if backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip(backends.why_unavailable("cpu", "cpu"))
    bits, k, g, sym = w
    qw = make_weight(n, k, bits, g, sym)
    wd = quant.dequantize(qw, torch.float64)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(260, k, dtype=torch.float64).to(dt)
        b = torch.randn(n, dtype=torch.float64).to(dt) if has_bias else None
        y = ops.quant_linear(x, qw, b, backend="cpu")
        assert y.shape == (260, n) and y.dtype == dt
        xd, bd = x.double(), None if b is None else b.double()
        want, scale = ref.quant_linear(xd, wd, bd), bound(xd, wd, bd)
        if dt == torch.float32:
            err = rel_err(y, want, scale)
            assert err <= 2e-6, f"{dt}: error {err:.3g} of the sum of |terms|"
        else:
            yt = F.linear(x, quant.dequantize(qw, dt), b)
            ref.assert_within_twice_torch(y, yt, want, floor=2.0 ** -8, name=str(dt), scale=scale)
