"""layer_norm, rms_norm and their add_ variants on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _env import LOW

import fastlm
from fastlm import ops
from fastlm import reference as ref

SHAPES = [(1, 1), (3, 7, 1023), (5, 123), (2, 4097), (0, 16)]
EPS = 1e-5


def ref_norm(kind, x, shape, w, b, residual=None):
    if kind == "layer":
        return ref.layer_norm(x, shape, w, b, EPS, residual)
    return ref.rms_norm(x, shape, w, EPS, residual)


def reference(kind, x, shape, w, b, r, dy=None, dh=None):
    """The float64 truth of one case: (y, h, [dx, dweight, dbias, dresidual]). h = x + r rounds to
    x's dtype, as torch's add; the gradients of <y, dy> + <h, dh> go through the float64 norm of
    that rounded h."""
    y, h = ref_norm(kind, cpu(x), shape, cpu(w), cpu(b), cpu(r))
    if dy is None:
        return y, h, None
    hd, wd, bd = (None if t is None else t.double().requires_grad_() for t in (h, cpu(w), cpu(b)))
    want = grads(ref_norm(kind, hd, shape, wd, bd)[0], [hd, wd, bd], dy)
    if dh is not None:
        want[0] = want[0] + dh
    return y, h, want + [want[0] if r is not None else None]


def run(kind, x, shape, w, b, eps, backend, residual=None):
    if residual is None:
        fn = ops.layer_norm if kind == "layer" else ops.rms_norm
        args = (w, b, eps) if kind == "layer" else (w, eps)
        return fn(x, shape, *args, backend=backend), None
    fn = ops.add_layer_norm if kind == "layer" else ops.add_rms_norm
    args = (w, b, eps) if kind == "layer" else (w, eps)
    return fn(x, residual, shape, *args, backend=backend)


def make(shape, ndims, dtype, device, affine, residual=False):
    norm_shape = shape[len(shape) - ndims:]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    w = b = r = None
    if affine:
        w = (1 + 0.5 * torch.randn(norm_shape, dtype=torch.float64)).to(dtype).to(device)
        b = (0.3 * torch.randn(norm_shape, dtype=torch.float64)).to(dtype).to(device)
    if residual:
        r = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    return x, norm_shape, w, b, r


def cpu(t):
    return None if t is None else t.detach().cpu()


def grads(out, inputs, dy):
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, live, dy, allow_unused=True)
    it = iter(got)
    return [next(it) if t is not None else None for t in inputs]


def check_case(kind, shape, ndims, dtype, device, backend, affine, residual, tol):
    x, ns, w, b, r = make(shape, ndims, dtype, device, affine, residual)
    if kind == "rms":
        b = None
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y, h = run(kind, x, ns, w, b, EPS, backend, r)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    if x.numel() == 0:
        yr, hr, _ = reference(kind, x, ns, w, b, r)
    else:
        # The reference sees the same rounded dy (and dy2 into h) as the kernel.
        dy = torch.randn(shape, dtype=torch.float64).to(dtype)
        dh = torch.randn(shape, dtype=torch.float64).to(dtype) if residual else None
        yr, hr, want = reference(kind, x, ns, w, b, r, dy.double(), None if dh is None else dh.double())
    torch.testing.assert_close(y.cpu().double(), yr, **tol)
    if residual:
        torch.testing.assert_close(h.cpu(), hr)  # the add is exact in the input dtype
    if x.numel() == 0:
        return
    got = grads((y, h) if residual else y, leaves, (dy.to(device), dh.to(device)) if residual else dy.to(device))
    for name, g, wg in zip(("dx", "dweight", "dbias", "dresidual"), got, want):
        if g is None:
            continue
        assert g.dtype == dtype, name
        scale = max(1.0, wg.abs().max().item())
        torch.testing.assert_close(g.cpu().double() / scale, wg / scale, **tol, msg=lambda m, n=name: f"{n}: {m}")


F32_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_float32(backend, device, kind, shape, affine):
    check_case(kind, shape, 1, torch.float32, device, backend, affine, False, F32_TOL)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(3, 7, 1023), (5, 123), (0, 8)], ids=str)
def test_add_norm(backend, device, kind, shape):
    check_case(kind, shape, 1, torch.float32, device, backend, True, True, F32_TOL)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_multidim_normalized_shape(backend, device, kind):
    check_case(kind, (4, 3, 5, 7), 2, torch.float32, device, backend, True, False, F32_TOL)


def test_float64(backend, device):
    if backend not in ("torch", "cpu"):
        pytest.skip("float64 runs on the torch and cpu backends")
    tol = dict(rtol=1e-12, atol=1e-12)
    for kind in ("layer", "rms"):
        check_case(kind, (6, 300), 1, torch.float64, device, backend, True, True, tol)


def low_precision_case(kind, dtype, device, backend, residual):
    """y and the gradients of a (64, 512) case in dtype, each beside its float64 truth."""
    x, ns, w, b, r = make((64, 512), 1, dtype, device, True, residual)
    if kind == "rms":
        b = None
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b, r)]
    y, _ = run(kind, x, ns, w, b, EPS, backend, r)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    got = [y] + grads(y, leaves, dy.to(device))
    yr, _, want = reference(kind, x, ns, w, b, r, dy.double())
    names = ("y", "dx", "dweight", "dbias", "dresidual")
    return {n: (g, t) for n, g, t in zip(names, got, [yr] + want) if g is not None}


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
def test_low_precision_within_twice_torch(backend, device, dtype, kind, residual):
    if backend == "torch":
        pytest.skip("the torch path is the yardstick here")
    torch.manual_seed(1)
    ours = low_precision_case(kind, dtype, device, backend, residual)
    torch.manual_seed(1)
    theirs = low_precision_case(kind, dtype, "cpu", "torch", residual)
    for name, (got, want) in ours.items():
        # The floor: one rounding of the result.
        ref.assert_within_twice_torch(got, theirs[name][0], want, floor=torch.finfo(dtype).eps, name=name)


def test_noncontiguous_input(backend, device):
    x = torch.randn(33, 64, dtype=torch.float32, device=device).t()  # (64, 33), strided
    w = torch.randn(33, device=device)
    y = ops.layer_norm(x, (33,), w, None, backend=backend)
    torch.testing.assert_close(y.double().cpu(), ref.layer_norm(x.cpu(), (33,), w.cpu())[0], **F32_TOL)


def test_weight_in_another_dtype_is_cast(backend, device):
    if backend not in ("torch", "cpu") and device == "cpu":
        pytest.skip("bfloat16 is not exercised under the Triton interpreter")
    x = torch.randn(8, 32, device=device, dtype=torch.bfloat16)
    w = torch.randn(32, device=device, requires_grad=True)  # float32 master weights
    y = ops.rms_norm(x, (32,), w, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_gradcheck_float64_cpu():
    if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    x = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, (3, 10), w, b, backend="cpu"), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, (3, 10), w, backend="cpu"), (x, w))
    assert torch.autograd.gradcheck(
        lambda x, r, w, b: ops.add_layer_norm(x, r, (3, 10), w, b, backend="cpu"), (x, r, w, b)
    )
    assert torch.autograd.gradcheck(lambda x, r, w: ops.add_rms_norm(x, r, (3, 10), w, backend="cpu"), (x, r, w))


def test_nan_propagates(backend, device):
    x = torch.randn(3, 16, device=device)
    x[1, 5] = float("nan")
    y = ops.layer_norm(x, (16,), backend=backend)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, err, words",
    [
        (lambda x, w: ops.layer_norm(x, (16,), w), ValueError, "normalized_shape"),
        (lambda x, w: ops.layer_norm(x, "32", w), TypeError, "normalized_shape"),
        (lambda x, w: ops.layer_norm(x, (32,), w[:8]), ValueError, "weight"),
        (lambda x, w: ops.layer_norm(x, (32,), None, w[:5]), ValueError, "bias"),
        (lambda x, w: ops.layer_norm(x.long(), (32,)), TypeError, "input"),
        (lambda x, w: ops.layer_norm(x.numpy(), (32,)), TypeError, "input"),
        (lambda x, w: ops.rms_norm(x, (32,), w.long()), TypeError, "weight"),
        (lambda x, w: ops.add_layer_norm(x, x[:2], (32,), w), ValueError, "residual"),
        (lambda x, w: ops.add_rms_norm(x, x.double(), (32,), w), TypeError, "residual"),
        (lambda x, w: ops.layer_norm(x, (32,), w, backend="nope"), RuntimeError, "unknown backend"),
    ],
)
def test_bad_input_names_the_argument(call, err, words):
    x, w = torch.randn(4, 32), torch.randn(32)
    with pytest.raises(err, match=words):
        call(x, w)


@pytest.mark.parametrize("op", [ops.add_layer_norm, ops.add_rms_norm])
def test_add_norm_refuses_a_missing_residual(backend, device, op):
    """residual=None would skip the add (the cpu kernels took it as "no residual"); every backend
    says so, naming residual, rather than returning (y, None) or failing inside torch."""
    x = torch.randn(4, 32, device=device)
    with pytest.raises(TypeError, match="residual"):
        op(x, None, (32,), backend=backend)


@pytest.mark.parametrize("eps", ["1e-5", None, [1e-5], True])
def test_eps_must_be_a_number(backend, device, eps):
    x = torch.randn(4, 32, device=device)
    with pytest.raises(TypeError, match="eps"):
        ops.layer_norm(x, (32,), eps=eps, backend=backend)
    if eps is not None:  # rms_norm's None means the dtype's epsilon
        with pytest.raises(TypeError, match="eps"):
            ops.add_rms_norm(x, x, (32,), eps=eps, backend=backend)


def _norm_c_args():
    x, w = torch.randn(4, 32), torch.randn(32)
    return x, w


@pytest.mark.parametrize("case, words", [
    (lambda x, w: torch.ops.fastlm_C.norm_fwd(x, w[:8], None, None, 1e-5, False), "weight"),
    (lambda x, w: torch.ops.fastlm_C.norm_fwd(x, None, w.double(), None, 1e-5, False), "bias"),
    (lambda x, w: torch.ops.fastlm_C.norm_fwd(x, None, None, x[:2].contiguous(), 1e-5, True), "residual"),
    (lambda x, w: torch.ops.fastlm_C.norm_fwd(x.int(), None, None, None, 1e-5, True), "x has dtype"),
    (lambda x, w: torch.ops.fastlm_C.norm_bwd(x, x, w, torch.zeros(4), torch.zeros(2), None, False, False),
     "rstd"),
    (lambda x, w: torch.ops.fastlm_C.norm_bwd(x, x, w, torch.zeros(1), torch.zeros(4), None, False, False),
     "mean"),
    (lambda x, w: torch.ops.fastlm_C.norm_bwd(x, x, w, torch.zeros(4), torch.zeros(4), x[:1].contiguous(),
                                              False, False), "dh"),
    (lambda x, w: torch.ops.fastlm_C.norm_bwd(x[:2].contiguous(), x, w, torch.zeros(4), torch.zeros(4), None,
                                              False, False), "dy"),
])
def test_raw_kernel_checks_its_arguments(case, words):
    """torch.ops.fastlm_C.norm_* read every argument by x's shape: a short one is refused, by name,
    instead of being read past its end (tests/test_bad_inputs.py runs the crash-prone rest in a
    child process)."""
    if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    with pytest.raises(RuntimeError, match=words):
        case(*_norm_c_args())


def test_wrong_dtype_for_backend():
    if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend 'triton' supports"):
        fastlm.ops._checks.backend_dtype("layer_norm", "triton", x)


def test_weight_on_other_device():
    meta_w = torch.empty(32, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        ops.layer_norm(torch.randn(4, 32), (32,), meta_w)


# --- torch.compile ----------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_fullgraph(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace the Triton interpreter")
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = fastlm.nn.LayerNorm(64)
            self.rms = fastlm.nn.RMSNorm(64)
            self.lin = torch.nn.Linear(64, 64)

        def forward(self, x, r):
            y, h = ops.add_layer_norm(x, r, (64,), self.ln.weight, self.ln.bias)
            return self.rms(self.lin(y)) + self.ln(h)

    model = Block().to(device)
    x = torch.randn(8, 64, device=device, requires_grad=True)
    r = torch.randn(8, 64, device=device)
    with fastlm.use_backend(backend):
        eager = model(x, r)
        (gx,) = torch.autograd.grad(eager.sum(), x)
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x, r)
        (gxc,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gxc, gx)


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
        kind=st.sampled_from(["layer", "rms"]),
        affine=st.booleans(),
        residual=st.booleans(),
    )
    def test_any_shape_matches_float64(lead, n, kind, affine, residual):
        if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
            pytest.skip("the cpu backend is not built")
        check_case(kind, (*lead, n), 1, torch.float32, "cpu", "cpu", affine, residual, F32_TOL)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_module_residual_argument(backend, device, kind):
    """norm(x, residual) of fastlm.nn returns (norm(x + residual), x + residual), the sum taken in the
    residual's dtype (a low-precision sub-layer output into a float32 stream, as under autocast);
    norm(x) stays torch's one-argument forward."""
    torch.manual_seed(0)
    mod = (fastlm.nn.LayerNorm(64) if kind == "layer" else fastlm.nn.RMSNorm(64, eps=1e-5)).to(device)
    with torch.no_grad():
        mod.weight.normal_()
    w = mod.weight.detach().cpu()
    b = mod.bias.detach().cpu() if kind == "layer" else None
    def truth(x, residual=None):
        if kind == "layer":
            return ref.layer_norm(x, (64,), w, b, 1e-5, residual=residual)
        return ref.rms_norm(x, (64,), w, 1e-5, residual=residual)

    x = torch.randn(3, 5, 64, device=device).to(LOW[0])
    r = torch.randn(3, 5, 64, device=device)
    with fastlm.use_backend(backend):
        y, h = mod(x, r)
        alone = mod(r)
    want_y, want_h = truth(x.float().cpu(), residual=r.cpu())
    assert h.dtype == y.dtype == torch.float32
    torch.testing.assert_close(h.cpu(), want_h, rtol=0, atol=0)
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=1e-5, atol=1e-5)
    assert isinstance(alone, torch.Tensor)
    torch.testing.assert_close(alone.cpu().double(), truth(r.cpu())[0], rtol=1e-5, atol=1e-5)
