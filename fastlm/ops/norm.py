"""Layer norm and RMS norm, alone or fused with the residual add of a pre-norm block.

    layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None)
    rms_norm(input, normalized_shape, weight=None, eps=None, *, backend=None)
    add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None)
    add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, backend=None)

The first two mirror torch.nn.functional. The add_ variants return (norm(x + residual), x + residual)
from one pass over memory: the pattern `h = h + block(h); y = norm(h)` of every pre-norm block.

Every backend but "torch" runs two kernel ops (fastlm/ops/_dispatch.py), registered as
torch.ops.fastlm.norm_fwd and torch.ops.fastlm.norm_bwd, over the input flattened to (rows, N).
The "torch" backend is the reference: it calls torch.nn.functional itself, so eager and compiled
torch see their own ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._dispatch import kernel_op

# --- the kernels -------------------------------------------------------------------------------


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@kernel_op("norm")
def norm_fwd(
    lib, x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None, eps: float, rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd) for x of shape (M, N); see csrc/fastlm.h for the full contract."""
    return lib.norm_fwd(x, weight, bias, residual, eps, rms)


@norm_fwd.register_fake
def _(x, weight, bias, residual, eps, rms):
    m = x.shape[0]
    stat = x.new_empty((m,), dtype=_stat_dtype(x))
    h = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = x.new_empty((0,), dtype=stat.dtype) if rms else torch.empty_like(stat)
    return torch.empty_like(x), h, mean, stat


@kernel_op("norm")
def norm_bwd(
    lib, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, dh: Tensor | None,
    rms: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of norm_fwd; dh, the gradient into h, is added to dx."""
    return lib.norm_bwd(dy, x, weight, mean, rstd, dh, rms, has_bias)


@norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, dh, rms, has_bias):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    db = x.new_empty((x.shape[1],)) if has_bias else x.new_empty((0,))
    return torch.empty_like(x), dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, _eps, rms = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
    ctx.rms, ctx.has_bias, ctx.has_residual = rms, bias is not None, residual is not None


def _backward(ctx, dy, dh, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dh = dh.contiguous() if ctx.has_residual and dh is not None else None
    dx, dw, db = norm_bwd.via(ctx)(dy.contiguous(), x, weight, mean, rstd, dh, ctx.rms, ctx.has_bias)
    return (
        dx,
        dw if weight is not None else None,
        db if ctx.has_bias else None,
        dx if ctx.has_residual else None,
        None, None,
    )


norm_fwd.register_autograd(_setup_context, _backward, nondiff_outputs=(2, 3))

# --- the public functions ---------------------------------------------------------------------


def _normalized_shape(op: str, normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    if isinstance(normalized_shape, torch.Size | Sequence) and all(
        isinstance(d, int) for d in normalized_shape
    ):
        return tuple(normalized_shape)
    raise TypeError(f"{op}: normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")


def _check(op, input, shape, weight, bias, eps, residual=None, fused=False):
    """fused: an add_ variant, whose residual is required (None would silently skip the add)."""
    name = "x" if fused else "input"
    _checks.tensor(op, name, input)
    if fused and residual is None:
        raise TypeError(f"{op}: residual must be a torch.Tensor, got None (use {op.removeprefix('add_')} "
                        "for a norm without a residual add)")
    if eps is not None or not op.endswith("rms_norm"):  # rms_norm's None: the dtype's epsilon
        _checks.real(op, "eps", eps)
    if not shape or input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise ValueError(
            f"{op}: normalized_shape {list(shape)} must match the trailing dims of {name}, "
            f"whose shape is {list(input.shape)}"
        )
    if residual is not None:
        _checks.like(op, "residual", residual, input, "x", shape=input.shape)
    # Parameters may be in another float dtype than the activations (fp32 weights under bf16
    # autocast): they are cast to the input's dtype, as a fused kernel reads one dtype.
    if weight is not None:
        _checks.like(op, "weight", weight, input, name, shape=shape, same_dtype=False)
    if bias is not None:
        _checks.like(op, "bias", bias, input, name, shape=shape, same_dtype=False)


def _choose(op, x, shape, backend):
    backend = backends.choose(op, x.device, backend)
    # Rows of zero length hold nothing to normalise; torch returns the right empty shapes.
    return "torch" if math.prod(shape) == 0 else backend


def _cast(t: Tensor | None, x: Tensor) -> Tensor | None:
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


def _run(op, x, residual, shape, weight, bias, eps, rms, backend):
    """Flatten to (rows, N), run the fused op, restore the shape. Returns (y, h)."""
    n = math.prod(shape)
    _checks.backend_dtype(op, backend, x)
    x2 = x.reshape(-1, n).contiguous()
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else None
    w = _cast(weight, x).reshape(n).contiguous() if weight is not None else None
    b = _cast(bias, x).reshape(n).contiguous() if bias is not None else None
    y, h, _, _ = norm_fwd(x2, w, b, r2, float(eps), rms, backend=backend)
    return y.view(x.shape), (h.view(x.shape) if residual is not None else None)


def layer_norm(
    input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
    eps: float = 1e-5, *, backend: str | None = None,
) -> Tensor:
    """torch.nn.functional.layer_norm, on the chosen backend."""
    shape = _normalized_shape("layer_norm", normalized_shape)
    _check("layer_norm", input, shape, weight, bias, eps)
    backend = _choose("layer_norm", input, shape, backend)
    if backend == "torch":
        return F.layer_norm(input, shape, _cast(weight, input), _cast(bias, input), eps)
    return _run("layer_norm", input, None, shape, weight, bias, eps, False, backend)[0]


def _rms_eps(eps: float | None, x: Tensor) -> float:
    return torch.finfo(x.dtype).eps if eps is None else eps


def rms_norm(
    input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None,
    *, backend: str | None = None,
) -> Tensor:
    """torch.nn.functional.rms_norm, on the chosen backend (eps=None means the dtype's epsilon)."""
    shape = _normalized_shape("rms_norm", normalized_shape)
    _check("rms_norm", input, shape, weight, None, eps)
    backend = _choose("rms_norm", input, shape, backend)
    if backend == "torch":
        return F.rms_norm(input, shape, _cast(weight, input), eps)
    return _run("rms_norm", input, None, shape, weight, None, _rms_eps(eps, input), True, backend)[0]


def add_layer_norm(
    x: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
    bias: Tensor | None = None, eps: float = 1e-5, *, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(layer_norm(x + residual), x + residual) in one pass."""
    shape = _normalized_shape("add_layer_norm", normalized_shape)
    _check("add_layer_norm", x, shape, weight, bias, eps, residual, fused=True)
    backend = _choose("add_layer_norm", x, shape, backend)
    if backend == "torch":
        h = x + residual
        return F.layer_norm(h, shape, _cast(weight, x), _cast(bias, x), eps), h
    return _run("add_layer_norm", x, residual, shape, weight, bias, eps, False, backend)


def add_rms_norm(
    x: Tensor, residual: Tensor, normalized_shape, weight: Tensor | None = None,
    eps: float | None = None, *, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    shape = _normalized_shape("add_rms_norm", normalized_shape)
    _check("add_rms_norm", x, shape, weight, None, eps, residual, fused=True)
    backend = _choose("add_rms_norm", x, shape, backend)
    if backend == "torch":
        h = x + residual
        return F.rms_norm(h, shape, _cast(weight, x), eps), h
    return _run("add_rms_norm", x, residual, shape, weight, None, _rms_eps(eps, x), True, backend)
