"""linear_cross_entropy against the float64 reference of the full logits, and F.cross_entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastlm import ops
from fastlm import reference as ref


def _inputs(n, d, v, device, ignored=0, dtype=torch.float32, lead=None):
    h = torch.randn(*(lead or (n,)), d, device=device, dtype=dtype) * 2
    w = torch.randn(v, d, device=device, dtype=dtype) / math.sqrt(d)
    t = torch.randint(0, v, h.shape[:-1], device=device)
    if ignored:
        t.view(-1)[torch.randperm(t.numel())[:ignored]] = -100
    return h.requires_grad_(), w.requires_grad_(), t


def _loss_and_grads(fn, h, w, t):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t)
    loss.backward()
    return {"loss": loss.detach(), "d input": h.grad, "d weight": w.grad}


def _torch(h, w, t):
    """The torch path: the full logits, then F.cross_entropy."""
    return F.cross_entropy(F.linear(h, w).flatten(0, -2), t.reshape(-1), ignore_index=-100)


def _float64(h, w, t):
    return _loss_and_grads(ref.linear_cross_entropy, h.double(), w.double(), t)


def _check_against_float64(ours, h, w, t):
    theirs = _loss_and_grads(_torch, h, w, t)
    for name, r in _float64(h, w, t).items():
        ref.assert_within_twice_torch(ours[name], theirs[name], r, floor=1e-6, name=name)


@pytest.mark.parametrize("n,d,v,chunk,ignored", [
    (1, 8, 5, None, 0),
    (17, 24, 33, 5, 3),       # chunks of 5 with a ragged last one, some targets ignored
    (64, 32, 1000, 16, 0),
    (300, 64, 257, None, 10),
])
def test_matches_float64_reference(backend, device, n, d, v, chunk, ignored):
    h, w, t = _inputs(n, d, v, device, ignored)
    fn = lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_size=chunk, backend=backend)  # noqa: E731
    _check_against_float64(_loss_and_grads(fn, h, w, t), h, w, t)


def test_leading_dims_and_int32_targets(backend, device):
    h, w, t = _inputs(0, 16, 40, device, ignored=2, lead=(3, 7))
    t32 = t.to(torch.int32)
    fn = lambda h, w, t: ops.linear_cross_entropy(h, w, t32, chunk_size=4, backend=backend)  # noqa: E731
    _check_against_float64(_loss_and_grads(fn, h, w, t), h, w, t)


def test_gradient_to_one_input_only_and_no_grad(backend, device):
    h, w, t = _inputs(20, 16, 50, device)
    want = _float64(h, w, t)
    hd = h.detach().clone().requires_grad_()
    ops.linear_cross_entropy(hd, w.detach(), t, chunk_size=6, backend=backend).backward()
    torch.testing.assert_close(hd.grad.double(), want["d input"], rtol=1e-4, atol=1e-6)
    wd = w.detach().clone().requires_grad_()
    ops.linear_cross_entropy(h.detach(), wd, t, chunk_size=6, backend=backend).backward()
    torch.testing.assert_close(wd.grad.double(), want["d weight"], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        loss = ops.linear_cross_entropy(h, w, t, chunk_size=6, backend=backend)
    torch.testing.assert_close(loss.double(), want["loss"], rtol=1e-5, atol=1e-6)


def test_upstream_gradient_scales_both(backend, device):
    h, w, t = _inputs(9, 8, 11, device)
    a = _loss_and_grads(lambda h, w, t: 3.0 * ops.linear_cross_entropy(h, w, t, backend=backend), h, w, t)
    b = _loss_and_grads(lambda h, w, t: 3.0 * _torch(h, w, t), h, w, t)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_all_targets_ignored_gives_nan_like_torch(backend, device):
    h, w, t = _inputs(4, 8, 6, device)
    t.fill_(-100)
    assert torch.isnan(ops.linear_cross_entropy(h, w, t, backend=backend))
    assert torch.isnan(_torch(h, w, t)) and torch.isnan(ref.linear_cross_entropy(h, w, t))


def test_float64_is_exact_to_float64_rounding():
    h, w, t = _inputs(30, 16, 70, "cpu", ignored=4, dtype=torch.float64)
    ours = _loss_and_grads(lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_size=7, backend="cpu"), h, w, t)
    want = _loss_and_grads(ref.linear_cross_entropy, h, w, t)
    for name in want:
        assert ours[name].dtype == torch.float64
        torch.testing.assert_close(ours[name], want[name], rtol=1e-12, atol=1e-14)


def test_compiles_fullgraph():
    h, w, t = _inputs(40, 16, 30, "cpu", ignored=3)
    fn = torch.compile(lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_size=16, backend="cpu"),
                       fullgraph=True)
    _check_against_float64(_loss_and_grads(fn, h, w, t), h, w, t)


def test_bfloat16_autocast_close_to_float32():
    h, w, t = _inputs(64, 32, 100, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _loss_and_grads(lambda h, w, t: ops.linear_cross_entropy(h, w, t, chunk_size=20, backend="cpu"), h, w, t)
    assert ours["d input"].dtype == torch.float32 and ours["d weight"].dtype == torch.float32
    for name, r in _float64(h, w, t).items():
        err = ref.error(ours[name], r)
        assert err < 3e-2, f"{name}: relative error {err:.2e} under bfloat16 autocast"


def test_bad_input_raises(backend, device):
    h, w, t = _inputs(5, 8, 10, device)
    with pytest.raises(ValueError, match="input's last dim"):
        ops.linear_cross_entropy(h[:, :4], w, t, backend=backend)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.linear_cross_entropy(h, w[0], t, backend=backend)
    with pytest.raises(ValueError, match="target of shape"):
        ops.linear_cross_entropy(h, w, t[:3], backend=backend)
    with pytest.raises(TypeError, match="target must be int32 or int64"):
        ops.linear_cross_entropy(h, w, t.float(), backend=backend)
    with pytest.raises(IndexError, match="target 10 is out of range"):
        ops.linear_cross_entropy(h, w, torch.full_like(t, 10), backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_cross_entropy(h, w, t, chunk_size=0, backend=backend)


@pytest.mark.parametrize("kw, err", [
    (dict(chunk_size=2.5), TypeError), (dict(chunk_size="4"), TypeError), (dict(chunk_size=True), TypeError),
    (dict(chunk_size=-3), ValueError), (dict(ignore_index=1.5), TypeError),
])
def test_bad_scalars_are_named(backend, device, kw, err):
    """A float chunk_size used to fail inside slicing, without naming it."""
    h, w, t = _inputs(5, 8, 10, device)
    with pytest.raises(err, match=next(iter(kw))):
        ops.linear_cross_entropy(h, w, t, **kw, backend=backend)
