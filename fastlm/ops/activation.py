"""Bias + GELU, the activation of a Transformer MLP fused with the bias add before it.

    bias_gelu(input, bias=None, approximate="tanh", *, backend=None)

Returns gelu(input + bias) in input's dtype from one pass over memory; `approximate` is
torch.nn.functional.gelu's ("tanh" or "none", the exact erf GELU). Every backend but "torch" runs
through two custom ops, torch.ops.fastlm.bias_gelu_fwd and torch.ops.fastlm.bias_gelu_bwd, over
the input flattened to (rows, N). The backward recomputes gelu'(x + bias) from the saved input, so
nothing but the input is kept; the bias gradient is summed over rows in float32.
The "torch" backend is the reference: F.gelu(input + bias), for eager and compiled torch alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks

APPROXIMATIONS = ("none", "tanh")

# --- kernels, by backend ----------------------------------------------------------------------


def _kernels(backend: str):
    if backend == "triton":
        from fastlm.kernels import activation

        return activation.bias_gelu_fwd, activation.bias_gelu_bwd
    # cpu and cuda share one op in fastlm._C; the dispatcher picks the kernel by device.
    return torch.ops.fastlm_C.bias_gelu_fwd, torch.ops.fastlm_C.bias_gelu_bwd


@torch.library.custom_op("fastlm::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Tensor | None, tanh: bool, backend: str) -> Tensor:
    """gelu(x + bias) for x of shape (M, N); see csrc/fastlm.h for the full contract."""
    return _kernels(backend)[0](x, bias, tanh)


@bias_gelu_fwd.register_fake
def _(x, bias, tanh, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastlm::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(
    dy: Tensor, x: Tensor, bias: Tensor | None, tanh: bool, need_dbias: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """(dx, dbias in bias's dtype, or empty without need_dbias) of bias_gelu_fwd."""
    dx, db = _kernels(backend)[1](dy, x, bias, tanh, need_dbias)
    # The kernels sum in float32; the gradient of a parameter comes back in its own dtype.
    return dx, (db.to(bias.dtype) if need_dbias and bias is not None else x.new_empty((0,)))


@bias_gelu_bwd.register_fake
def _(dy, x, bias, tanh, need_dbias, backend):
    db = x.new_empty((x.shape[1],), dtype=bias.dtype) if need_dbias and bias is not None else x.new_empty((0,))
    return torch.empty_like(x), db


def _setup_context(ctx, inputs, output):
    x, bias, tanh, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.tanh, ctx.backend = tanh, backend


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, db = torch.ops.fastlm.bias_gelu_bwd(dy.contiguous(), x, bias, ctx.tanh, need_dbias, ctx.backend)
    return dx, (db if need_dbias else None), None, None


bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """bias_gelu_fwd and its backward calling the kernels directly, outside torch.compile: the
    custom op's Python layers cost about 100 us a call (see docs/design.md). Same kernels, same
    results."""

    @staticmethod
    def forward(ctx, x, bias, tanh, backend):
        y = _kernels(backend)[0](x, bias, tanh)
        _setup_context(ctx, (x, bias, tanh, backend), y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[1]
        dx, db = _kernels(ctx.backend)[1](dy.contiguous(), x, bias, ctx.tanh, need_dbias)
        return dx, (db.to(bias.dtype) if need_dbias else None), None, None

# --- the public function ----------------------------------------------------------------------


def _check(op: str, input, bias, approximate) -> None:
    _checks.tensor(op, "input", input)
    if input.dim() < 1:
        raise ValueError(f"{op}: input must have at least one dimension, got a 0-d tensor")
    if bias is not None:
        # A bias in another float dtype (fp32 master weights under bf16 autocast) is cast to the
        # input's dtype, as a fused kernel reads one dtype.
        _checks.like(op, "bias", bias, input, "input", shape=(input.shape[-1],), same_dtype=False)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def bias_gelu(
    input: Tensor, bias: Tensor | None = None, approximate: str = "tanh", *, backend: str | None = None
) -> Tensor:
    """gelu(input + bias) over the last dim (bias of shape (N,) or None), on the chosen backend."""
    _check("bias_gelu", input, bias, approximate)
    backend = backends.choose("bias_gelu", input.device, backend)
    b = bias if bias is None or bias.dtype == input.dtype else bias.to(input.dtype)
    # Nothing to compute: torch returns the right empty shapes.
    if backend == "torch" or input.numel() == 0:
        return F.gelu(input if b is None else input + b, approximate=approximate)
    _checks.backend_dtype("bias_gelu", backend, input)
    n = input.shape[-1]
    x2 = input.reshape(-1, n).contiguous()
    b = b.contiguous() if b is not None else None
    if _checks.direct(x2, b):
        y = _kernels(backend)[0](x2, b, approximate == "tanh")
    else:
        fwd = torch.ops.fastlm.bias_gelu_fwd if torch.compiler.is_compiling() else _EagerBiasGelu.apply
        y = fwd(x2, b, approximate == "tanh", backend)
    return y.view(input.shape)
