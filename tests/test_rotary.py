"""rotary_embedding on every backend, forward and backward, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _env import INTERPRET, LOW

from fastlm import ops
from fastlm import reference as ref

# (B, Hq, Hk, T, D, R): GQA, T = 1 (a decode step), partial rotary with a half (6) below the
# vector width, head dims that are not a multiple of 8, one head of each.
SHAPES = [(2, 4, 2, 17, 64, 64), (1, 3, 1, 1, 24, 24), (2, 2, 2, 5, 20, 12), (1, 1, 1, 9, 6, 6),
          (3, 2, 1, 33, 40, 32)]
LAYOUTS = (False, True)
F32 = dict(rtol=1e-5, atol=1e-5)


def make(b, hq, hk, t, d, dtype, device):
    q = torch.randn(b, hq, t, d, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(b, hk, t, d, dtype=torch.float64).to(dtype).to(device)
    return q, k


def tables(positions, r, interleaved, dtype=torch.float32, theta=10000.0):
    cos, sin = ref.rotary_tables(positions, theta, r, interleaved)
    return cos.to(dtype), sin.to(dtype)


def reference(q, k, cos, sin, interleaved, dq, dk, table_grads=False):
    """(q', k', dq, dk[, dcos, dsin]) in float64 on the CPU, from the inputs the kernel saw."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k)]
    cd, sd = (t.detach().cpu().double().requires_grad_(table_grads) for t in (cos, sin))
    c4, s4 = (t[:, None] if t.dim() == 3 else t for t in (cd, sd))
    outs = [ref.rotary(x, c4, s4, interleaved) for x in leaves]
    wrt = leaves + ([cd, sd] if table_grads else [])
    grads = torch.autograd.grad(outs, wrt, [dq.cpu().double(), dk.cpu().double()])
    return [o.detach() for o in outs] + list(grads)


def run(q, k, cos, sin, interleaved, dq, dk, backend, table_grads=False, **kw):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    if table_grads:
        cos, sin = cos.detach().requires_grad_(), sin.detach().requires_grad_()
    qo, ko = ops.rotary_embedding(q, k, cos, sin, interleaved=interleaved, backend=backend, **kw)
    wrt = [q, k] + ([cos, sin] if table_grads else [])
    grads = torch.autograd.grad([qo, ko], wrt, [dq.to(q), dk.to(k)])
    return [qo, ko] + list(grads)


def close(got, want, tol, name):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().cpu().double() / scale, want / scale, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("interleaved", LAYOUTS, ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tables_float32(backend, device, shape, interleaved):
    b, hq, hk, t, d, r = shape
    q, k = make(b, hq, hk, t, d, torch.float32, device)
    # Per-sequence positions (a batch of different offsets) and a broadcast batch-1 table.
    positions = torch.arange(t)[None] + 7 * torch.arange(b)[:, None]
    for pos in (positions, positions[:1]):
        cos, sin = (x.to(device) for x in tables(pos, r, interleaved))
        dq, dk = torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64)
        got = run(q, k, cos, sin, interleaved, dq, dk, backend)
        want = reference(q, k, cos, sin, interleaved, dq, dk)
        for g, w, name in zip(got, want, ("q_rot", "k_rot", "dq", "dk")):
            assert g.dtype == torch.float32 and g.shape == w.shape and g.device.type == device
            close(g, w, F32, name)


@pytest.mark.parametrize("interleaved", LAYOUTS, ids=["half", "interleaved"])
def test_table_shapes_transformers_passes(backend, device, interleaved):
    """(T, R), (1, T, R), (B, T, R) and (B, 1, T, R) tables give one result."""
    q, k = make(2, 4, 2, 6, 16, torch.float32, device)
    cos, sin = (x.to(device) for x in tables(torch.arange(3, 9), 16, interleaved))
    want = ops.rotary_embedding(q, k, cos[None], sin[None], interleaved=interleaved, backend=backend)
    for c, s in ((cos, sin), (cos.expand(2, -1, -1), sin.expand(2, -1, -1)),
                 (cos[None, None].expand(2, 1, -1, -1), sin[None, None].expand(2, 1, -1, -1))):
        got = ops.rotary_embedding(q, k, c, s, interleaved=interleaved, backend=backend)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", LAYOUTS, ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_positions_match_tables(backend, device, shape, interleaved):
    """The position form equals the float64 tables' rotation, at an offset (decode) and with
    per-sequence positions, forward and backward."""
    b, hq, hk, t, d, r = shape
    q, k = make(b, hq, hk, t, d, torch.float32, device)
    for pos in (torch.arange(t) + 1000, torch.arange(t)[None] * 3 + torch.arange(b)[:, None] * 11):
        c64, s64 = ref.rotary_tables(pos if pos.dim() == 2 else pos[None], 500000.0, r, interleaved)
        dq, dk = torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64)
        got = run(q, k, None, None, interleaved, dq, dk, backend, position_ids=pos.to(device), theta=500000.0,
                  rotary_dim=r)
        want = reference(q, k, c64, s64, interleaved, dq, dk)
        for g, w, name in zip(got, want, ("q_rot", "k_rot", "dq", "dk")):
            close(g, w, dict(rtol=2e-5, atol=2e-5), name)


def test_fused_qkv_views(backend, device):
    """q and k as strided views of one (B, T, 3, H, D) projection are read in place."""
    b, t, h, d = 2, 7, 3, 32
    qkv = torch.randn(b, t, 3, h, d, dtype=torch.float32, device=device)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous()
    cos, sin = (x.to(device) for x in tables(torch.arange(t), d, False))
    dq, dk = torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64)
    got = run(q, k, cos, sin, False, dq, dk, backend)
    want = reference(q, k, cos, sin, False, dq, dk)
    for g, w, name in zip(got, want, ("q_rot", "k_rot", "dq", "dk")):
        close(g, w, F32, name)


@pytest.mark.parametrize("interleaved", LAYOUTS, ids=["half", "interleaved"])
def test_table_gradients(backend, device, interleaved):
    """Tables that require grad get theirs (summed over heads, and over batch for a batch-1 one)."""
    q, k = make(2, 4, 2, 5, 16, torch.float32, device)
    for bc in (2, 1):
        cos, sin = (torch.randn(bc, 5, 12, device=device) for _ in range(2))
        dq, dk = torch.randn(q.shape, dtype=torch.float64), torch.randn(k.shape, dtype=torch.float64)
        got = run(q, k, cos, sin, interleaved, dq, dk, backend, table_grads=True)
        want = reference(q, k, cos, sin, interleaved, dq, dk, table_grads=True)
        for g, w, name in zip(got, want, ("q_rot", "k_rot", "dq", "dk", "dcos", "dsin")):
            close(g, w, dict(rtol=2e-5, atol=2e-5), name)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("interleaved", LAYOUTS, ids=["half", "interleaved"])
def test_low_precision_within_twice_torch(backend, device, dtype, interleaved):
    q, k = make(2, 4, 2, 33, 64, dtype, device)
    cos, sin = (x.to(device) for x in tables(torch.arange(33) + 40, 64, interleaved, dtype))
    dq, dk = (torch.randn(x.shape, dtype=torch.float64).to(dtype) for x in (q, k))
    got = run(q, k, cos, sin, interleaved, dq, dk, backend)
    base = run(q, k, cos, sin, interleaved, dq, dk, "torch")
    want = reference(q, k, cos, sin, interleaved, dq, dk)
    for g, t, w, name in zip(got, base, want, ("q_rot", "k_rot", "dq", "dk")):
        assert g.dtype == dtype
        ref.assert_within_twice_torch(g, t, w, floor=2 * torch.finfo(dtype).eps, name=name)


def test_empty_and_zero_rotary_dim(backend, device):
    q, k = make(2, 3, 1, 0, 8, torch.float32, device)
    qo, ko = ops.rotary_embedding(q, k, position_ids=torch.arange(0, device=device), backend=backend)
    assert qo.shape == q.shape and ko.shape == k.shape
    q, k = make(1, 2, 1, 3, 8, torch.float32, device)
    qo, ko = ops.rotary_embedding(q, k, position_ids=torch.arange(3, device=device), rotary_dim=0, backend=backend)
    torch.testing.assert_close(qo, q, rtol=0, atol=0)
    torch.testing.assert_close(ko, k, rtol=0, atol=0)


def test_nan_and_inf_propagate(backend, device):
    q, k = make(1, 2, 1, 4, 8, torch.float32, device)
    q[0, 0, 1, 2] = float("nan")
    k[0, 0, 2, 0] = float("inf")
    cos, sin = (x.to(device) for x in tables(torch.arange(4), 8, False))
    got = ops.rotary_embedding(q, k, cos, sin, backend=backend)
    want = ops.rotary_embedding(q, k, cos, sin, backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)) and torch.equal(torch.isinf(g), torch.isinf(w))


# --- bad input ------------------------------------------------------------------------------------


def _bad_cases(device):
    q, k = make(2, 4, 2, 5, 16, torch.float32, device)
    cos, sin = (x.to(device) for x in tables(torch.arange(5), 16, False))
    return [
        ((q, k[..., :8], cos, sin), {}, ValueError, "head dim"),
        ((q, k[:, :, :3], cos, sin), {}, ValueError, "share batch and time"),
        ((q, k, cos[:4], sin[:4]), {}, ValueError, "cos must have shape"),
        ((q, k, cos, sin[..., :8]), {}, ValueError, "one shape"),
        ((q[..., :15], k[..., :15], cos[..., :15], sin[..., :15]), {}, ValueError, "must be even"),
        ((q, k, cos), {}, TypeError, "cos and sin go together"),
        ((q, k), {}, TypeError, "position_ids"),
        ((q, k, cos, sin), {"position_ids": torch.arange(5, device=device)}, TypeError, "not both"),
        ((q, k, cos, sin), {"rotary_dim": 8}, TypeError, "rotary_dim goes with position_ids"),
        ((q, k), {"position_ids": torch.arange(5.0, device=device)}, TypeError, "integer"),
        ((q, k), {"position_ids": torch.arange(4, device=device)}, ValueError, "position_ids must have shape"),
        ((q, k), {"position_ids": torch.arange(5, device=device), "theta": 0.0}, ValueError, "theta"),
        ((q, k), {"position_ids": torch.arange(5, device=device), "rotary_dim": 7}, ValueError, "rotary_dim"),
        ((q, k), {"position_ids": torch.arange(5, device=device), "rotary_dim": 2.0}, TypeError, "rotary_dim"),
        ((q[0], k[0], cos, sin), {}, ValueError, "4-D"),
        ((q, k.double(), cos, sin), {}, TypeError, "dtype"),
        ((q.long(), k, cos, sin), {}, TypeError, "floating-point"),
    ]


def test_bad_input_is_named(backend, device):
    for args, kw, exc, text in _bad_cases(device):
        with pytest.raises(exc, match=text):
            ops.rotary_embedding(*args, backend=backend, **kw)


@pytest.mark.skipif(INTERPRET, reason="the raw CPU kernels; the Triton launchers have their own checks")
def test_raw_kernels_check_their_arguments():
    q, k = make(2, 4, 2, 5, 16, torch.float32, "cpu")
    cos, sin = tables(torch.arange(5), 16, False)
    raw = torch.ops.fastlm_C
    bad = [
        lambda: raw.rotary_fwd(q, k[..., :8], cos[None], sin[None], False, False),
        lambda: raw.rotary_fwd(q, k, cos, sin, False, False),                  # 2-D tables
        lambda: raw.rotary_fwd(q, k, cos[None, :4], sin[None, :4], False, False),
        lambda: raw.rotary_fwd(q, k, cos[None].double(), sin[None].double(), False, False),
        lambda: raw.rotary_fwd(q, k, cos[None, :, :15], sin[None, :, :15], False, False),
        lambda: raw.rotary_fwd(q.transpose(2, 3), k, cos[None], sin[None], False, False),
        lambda: raw.rotary_pos_fwd(q, k, torch.arange(5)[None].int(), 1e4, 16, False, False),
        lambda: raw.rotary_pos_fwd(q, k, torch.arange(5)[None], -1.0, 16, False, False),
        lambda: raw.rotary_pos_fwd(q, k, torch.arange(5)[None], 1e4, 18, False, False),
        lambda: raw.rotary_pos_fwd(q, k, torch.arange(4)[None], 1e4, 16, False, False),
    ]
    for call in bad:
        with pytest.raises(RuntimeError, match="rotary"):
            call()


# --- autograd and compile -----------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRET, reason="float64 runs on the CPU backend")
@pytest.mark.parametrize("interleaved", LAYOUTS, ids=["half", "interleaved"])
def test_gradcheck_and_double_backward(interleaved):
    q, k = (x.requires_grad_() for x in make(1, 2, 1, 3, 8, torch.float64, "cpu"))
    cos, sin = (torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(q, k, c, s):
        return ops.rotary_embedding(q, k, c, s, interleaved=interleaved, backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, cos, sin))
    assert torch.autograd.gradgradcheck(f, (q, k, cos, sin))

    def g(q, k):
        return ops.rotary_embedding(q, k, position_ids=torch.arange(3) + 2, interleaved=interleaved, backend="cpu")

    assert torch.autograd.gradcheck(g, (q, k))


@pytest.mark.skipif(INTERPRET, reason="opcheck runs the CPU kernels")
def test_opcheck():
    q, k = make(2, 4, 2, 5, 16, torch.float32, "cpu")
    cos, sin = tables(torch.arange(5), 16, False)
    torch.library.opcheck(torch.ops.fastlm.rotary_fwd.default, (q, k, cos[None], sin[None], False, False, "cpu"))
    torch.library.opcheck(torch.ops.fastlm.rotary_pos_fwd.default,
                          (q, k, torch.arange(5)[None], 1e4, 12, True, False, "cpu"))


def test_compile_fullgraph(backend, device):
    if INTERPRET:
        pytest.skip("torch.compile does not trace the Triton interpreter")
    q, k = make(2, 4, 2, 6, 16, torch.float32, device)
    cos, sin = (x.to(device) for x in tables(torch.arange(6), 16, False))
    pos = torch.arange(6, device=device) + 3

    def f(q, k):
        a, b = ops.rotary_embedding(q, k, cos, sin, backend=backend)
        c, d = ops.rotary_embedding(a, b, position_ids=pos, interleaved=True, backend=backend)
        return (c.square().sum() + d.sum()) * 0.5

    compiled = torch.compile(f, fullgraph=True)
    for fn in (f, compiled):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = fn(qq, kk)
        loss.backward()
        if fn is f:
            want = (loss.detach(), qq.grad, kk.grad)
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(qq.grad, want[1])
    torch.testing.assert_close(kk.grad, want[2])
