"""bias_gelu on every backend, forward and backward, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _env import LOW

import fastlm
from fastlm import ops
from fastlm import reference as ref

ROWS = (1, 3, 257)
WIDTHS = (1, 7, 64, 1000, 4096)
SHAPES = [(m, n) for m in ROWS for n in WIDTHS] + [(2, 5, 96), (4, 3, 7)]
APPROX = ("tanh", "none")
F32_TOL = dict(rtol=1e-5, atol=1e-5)


def make(shape, dtype, device, has_bias):
    # Wide enough to reach both saturated tails of the GELU, where tanh and erf round to +-1.
    x = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).to(device)
    b = (torch.randn(shape[-1], dtype=torch.float64)).to(dtype).to(device) if has_bias else None
    return x, b


def reference(x, b, dy, approximate):
    """(y, dx, dbias) in float64 on the CPU, from the (rounded) inputs the kernel saw."""
    xd = x.detach().cpu().double().requires_grad_()
    bd = b.detach().cpu().double().requires_grad_() if b is not None else None
    y = ref.bias_gelu(xd, bd, approximate)
    leaves = [xd] if bd is None else [xd, bd]
    grads = torch.autograd.grad(y, leaves, dy)
    return y.detach(), grads[0], (grads[1] if bd is not None else None)


def run(x, b, dy, approximate, backend):
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = ops.bias_gelu(x, b, approximate, backend=backend)
    leaves = [x] if b is None else [x, b]
    grads = torch.autograd.grad(y, leaves, dy.to(x.dtype).to(x.device))
    return y, grads[0], (grads[1] if b is not None else None)


def scaled_close(got, want, tol, name):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.cpu().double() / scale, want / scale, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_float32(backend, device, approximate, shape, has_bias):
    x, b = make(shape, torch.float32, device, has_bias)
    dy = torch.randn(shape, dtype=torch.float64)
    y, dx, db = run(x, b, dy, approximate, backend)
    yr, dxr, dbr = reference(x, b, dy, approximate)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.device == x.device
    scaled_close(y, yr, F32_TOL, "y")
    assert dx.dtype == torch.float32 and dx.shape == x.shape
    scaled_close(dx, dxr, F32_TOL, "dx")
    if has_bias:
        assert db.dtype == torch.float32 and db.shape == b.shape
        # A sum over up to 257 rows (times 5 for 3-D input): float32 accumulation error grows with it.
        scaled_close(db, dbr, dict(rtol=1e-5, atol=2e-5), "dbias")


@pytest.mark.parametrize("approximate", APPROX)
def test_threads_and_long_rows(backend, device, approximate):
    """Several threads (rows split into parts, dbias from partial rows) and rows longer than one
    CPU tile (4096 columns), with a ragged end."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(max(2, n_threads))
    try:
        for shape in ((37, 5003), (1, 9000), (300, 24)):
            x, b = make(shape, torch.float32, device, True)
            dy = torch.randn(shape, dtype=torch.float64)
            for got, want, name in zip(run(x, b, dy, approximate, backend), reference(x, b, dy, approximate),
                                       ("y", "dx", "dbias")):
                scaled_close(got, want, dict(rtol=1e-5, atol=2e-5), name)
    finally:
        torch.set_num_threads(n_threads)


def test_float64(backend, device):
    if backend not in ("torch", "cpu"):
        pytest.skip("float64 runs on the torch and cpu backends")
    tol = dict(rtol=1e-12, atol=1e-12)
    for approximate in APPROX:
        x, b = make((6, 300), torch.float64, device, True)
        dy = torch.randn(6, 300, dtype=torch.float64)
        for got, want, name in zip(run(x, b, dy, approximate, backend), reference(x, b, dy, approximate),
                                   ("y", "dx", "dbias")):
            assert got.dtype == torch.float64
            scaled_close(got, want, tol, name)


def low_precision_case(dtype, device, backend, approximate):
    """y, dx and dbias of a (64, 512) case in dtype, each beside its float64 truth."""
    x, b = make((64, 512), dtype, device, True)
    dy = torch.randn(64, 512, dtype=torch.float64)
    got = run(x, b, dy.to(dtype), approximate, backend)
    # The reference sees the same rounded dy as the kernel.
    want = reference(x, b, dy.to(dtype).double(), approximate)
    return dict(zip(("y", "dx", "dbias"), zip(got, want)))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
def test_low_precision_within_twice_torch(backend, device, dtype, approximate):
    if backend == "torch":
        pytest.skip("the torch path is the yardstick here")
    torch.manual_seed(1)
    ours = low_precision_case(dtype, device, backend, approximate)
    torch.manual_seed(1)
    theirs = low_precision_case(dtype, "cpu", "torch", approximate)
    for name, (got, want) in ours.items():
        # The floor: one rounding of the result.
        ref.assert_within_twice_torch(got, theirs[name][0], want, floor=torch.finfo(dtype).eps, name=name)


def test_bias_in_another_dtype_is_cast(backend, device):
    if backend not in ("torch", "cpu") and device == "cpu":
        pytest.skip("bfloat16 is not exercised under the Triton interpreter")
    x = torch.randn(8, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)  # float32 master weights
    y = ops.bias_gelu(x, b, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert b.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()
    assert x.grad.dtype == torch.bfloat16


def test_no_bias_grad_when_bias_is_frozen(backend, device):
    x = torch.randn(5, 16, device=device, requires_grad=True)
    b = torch.randn(16, device=device)  # requires_grad=False
    y = ops.bias_gelu(x, b, backend=backend)
    (dx,) = torch.autograd.grad(y.sum(), x)
    _, dxr, _ = reference(x, b, torch.ones(5, 16, dtype=torch.float64), "tanh")
    scaled_close(dx, dxr, F32_TOL, "dx")


def test_noncontiguous_input(backend, device):
    x = torch.randn(33, 64, device=device).t()  # (64, 33), strided
    b = torch.randn(33, device=device)
    y = ops.bias_gelu(x, b, "none", backend=backend)
    yr = ref.bias_gelu(x.cpu(), b.cpu(), "none")
    scaled_close(y, yr, F32_TOL, "y")


def test_empty_input(backend, device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y = ops.bias_gelu(x, b, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert b.grad.shape == (16,) and (b.grad == 0).all()


def test_nan_propagates(backend, device):
    x = torch.randn(3, 16, device=device)
    x[1, 5] = float("nan")
    for approximate in APPROX:
        y = ops.bias_gelu(x, torch.zeros(16, device=device), approximate, backend=backend)
        assert torch.isnan(y[1, 5]) and torch.isfinite(y[0]).all() and torch.isfinite(y[1, :5]).all()


def test_extreme_inputs_stay_finite(backend, device):
    # Far out in both tails the tanh form's exponential overflows unless clamped.
    x = torch.tensor([[-1e4, -100.0, -20.0, -9.0, 0.0, 9.0, 20.0, 100.0, 1e4]], device=device)
    for approximate in APPROX:
        xg = x.clone().requires_grad_()
        y = ops.bias_gelu(xg, None, approximate, backend=backend)
        (dx,) = torch.autograd.grad(y.sum(), xg)
        yr, dxr, _ = reference(x, None, torch.ones_like(x, dtype=torch.float64, device="cpu"), approximate)
        torch.testing.assert_close(y.cpu().double(), yr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx.cpu().double(), dxr, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64_cpu():
    if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    x = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    for approximate in APPROX:
        assert torch.autograd.gradcheck(lambda x, b, a=approximate: ops.bias_gelu(x, b, a, backend="cpu"), (x, b))
        assert torch.autograd.gradcheck(lambda x, a=approximate: ops.bias_gelu(x, None, a, backend="cpu"), (x,))


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, err, words",
    [
        (lambda x, b: ops.bias_gelu(x, b[:8]), ValueError, "bias must have shape"),
        (lambda x, b: ops.bias_gelu(x, b.reshape(4, 8)), ValueError, "bias"),
        (lambda x, b: ops.bias_gelu(x, b.long()), TypeError, "bias"),
        (lambda x, b: ops.bias_gelu(x.long(), b), TypeError, "input"),
        (lambda x, b: ops.bias_gelu(x.numpy(), b), TypeError, "input"),
        (lambda x, b: ops.bias_gelu(x, b.numpy()), TypeError, "bias"),
        (lambda x, b: ops.bias_gelu(x[0, 0], None), ValueError, "input"),
        (lambda x, b: ops.bias_gelu(x, b, "sigmoid"), ValueError, "approximate"),
        (lambda x, b: ops.bias_gelu(x, b, backend="nope"), RuntimeError, "unknown backend"),
    ],
)
def test_bad_input_names_the_argument(call, err, words):
    x, b = torch.randn(4, 32), torch.randn(32)
    with pytest.raises(err, match=words):
        call(x, b)


def test_wrong_dtype_for_backend():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        fastlm.ops._checks.backend_dtype("bias_gelu", "triton", x)


def test_bias_on_other_device():
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.bias_gelu(torch.randn(4, 32), torch.empty(32, device="meta"))


# --- torch.compile ----------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_fullgraph(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace the Triton interpreter")
    torch._dynamo.reset()

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(32, 128, bias=False)
            self.bias = torch.nn.Parameter(torch.randn(128))
            self.down = torch.nn.Linear(128, 32)

        def forward(self, x):
            return self.down(ops.bias_gelu(self.up(x), self.bias)) + ops.bias_gelu(x, None, "none")

    model = MLP().to(device)
    x = torch.randn(2, 8, 32, device=device, requires_grad=True)
    with fastlm.use_backend(backend):
        eager = model(x)
        gx, gb = torch.autograd.grad(eager.sum(), (x, model.bias))
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        gxc, gbc = torch.autograd.grad(out.sum(), (x, model.bias))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gxc, gx)
    torch.testing.assert_close(gbc, gb)


# --- any shape --------------------------------------------------------------------------------

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # hypothesis comes with the dev extra
    given = None

if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(
        lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
        n=st.integers(1, 300),
        approximate=st.sampled_from(APPROX),
        has_bias=st.booleans(),
    )
    def test_any_shape_matches_float64(lead, n, approximate, has_bias):
        if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
            pytest.skip("the cpu backend is not built")
        shape = (*lead, n)
        x, b = make(shape, torch.float32, "cpu", has_bias)
        dy = torch.randn(shape, dtype=torch.float64)
        for got, want, name in zip(run(x, b, dy, approximate, "cpu"), reference(x, b, dy, approximate),
                                   ("y", "dx", "dbias")):
            if want is not None:
                scaled_close(got, want, dict(rtol=1e-5, atol=2e-5), name)


@pytest.mark.parametrize("quantized", [False, True])
def test_linear_gelu(backend, device, quantized):
    """linear_gelu = gelu(linear(x, W, b)) for a float or an int8 weight, forward and the gradients
    of x and b: the fastlm backends move the bias add into the GELU, the torch one keeps it in the
    matmul; both against the float64 truth."""
    from fastlm import quant

    torch.manual_seed(0)
    x = torch.randn(7, 64, device=device, requires_grad=True)
    w = torch.randn(96, 64, device=device) / 8
    b = torch.randn(96, device=device, requires_grad=True)
    weight = quant.quantize(w, bits=8) if quantized else w
    y = ops.linear_gelu(x, weight, b, backend=backend)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    wd = quant.dequantize(weight.to("cpu"), torch.float64) if quantized else w.cpu().double()
    xd, bd = x.detach().cpu().double().requires_grad_(), b.detach().cpu().double().requires_grad_()
    yd = ref.bias_gelu(xd @ wd.t(), bd, "tanh")
    dxd, dbd = torch.autograd.grad(yd, (xd, bd), dy.cpu().double())
    for got, want in ((y, yd), (dx, dxd), (db, dbd)):
        assert ref.error(got.detach().cpu(), want.detach()) <= 1e-5


EXTREMES = [float("-inf"), -3e38, -1e30, -1e20, -1e6, -20.0, -10.5, -9.5, -5.0, 0.0, 5.0, 9.5, 1e6, 1e30, 3e38,
            float("inf"), float("nan")]


@pytest.mark.parametrize("approximate", APPROX)
def test_extremes_saturate_like_torch(backend, device, approximate):
    """Huge inputs give torch's -0 / v / NaN, not the finite garbage a capped exponent gives
    (v / (1 + e^80) is -5414.55 at -3e38)."""
    if backend == "torch":
        pytest.skip("the torch path is the yardstick here")
    x = torch.tensor(EXTREMES, device=device)
    got = ops.bias_gelu(x, approximate=approximate, backend=backend).cpu()
    want = torch.nn.functional.gelu(torch.tensor(EXTREMES, dtype=torch.float64), approximate=approximate)
    want32 = torch.nn.functional.gelu(torch.tensor(EXTREMES), approximate=approximate)
    # Where torch's float32 erf GELU itself overflows (3e38 -> inf, inf -> NaN), either answer is
    # torch's; everywhere else float64's is the truth.
    own = want32.isfinite() != want.isfinite()
    got, want, want32 = got[~own], want[~own], want32[~own]
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-7)
    # The same signs of zero as torch's float32 answer where it is exact (not its inf at 3e38).
    both = finite & want32.isfinite()
    assert torch.equal(torch.signbit(got[both]), torch.signbit(want32[both]))


@pytest.mark.parametrize("approximate", APPROX)
def test_extreme_gradients_are_limits_or_nan(backend, device, approximate):
    """gelu' at finite extremes is its limit (0 below, 1 above) as in float64; at +-inf and NaN
    it is NaN, as torch's is (the backward must not meet inf * 0 nor return +-inf)."""
    if backend == "torch":
        pytest.skip("the torch path is the yardstick here")
    x = torch.tensor(EXTREMES, device=device, requires_grad=True)
    (dx,) = torch.autograd.grad(ops.bias_gelu(x, approximate=approximate, backend=backend).sum(), x)
    xd = torch.tensor(EXTREMES, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(ref.bias_gelu(xd, None, approximate).sum(), xd)
    dx = dx.cpu().double()
    inf_or_nan = ~torch.tensor(EXTREMES).isfinite()
    assert dx[inf_or_nan].isnan().all()
    torch.testing.assert_close(dx[~inf_or_nan], want[~inf_or_nan], rtol=1e-5, atol=1e-6)
