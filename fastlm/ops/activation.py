"""Bias + GELU, the activation of a Transformer MLP fused with the bias add before it.

    bias_gelu(input, bias=None, approximate="tanh", *, backend=None)

    linear_gelu(input, weight, bias=None, approximate="tanh", *, backend=None)

bias_gelu returns gelu(input + bias) in input's dtype from one pass over memory; `approximate` is
torch.nn.functional.gelu's ("tanh" or "none", the exact erf GELU). Every backend but "torch" runs
two kernel ops (fastlm/ops/_dispatch.py), registered as torch.ops.fastlm.bias_gelu_fwd and
torch.ops.fastlm.bias_gelu_bwd, over the input flattened to (rows, N). The backward recomputes
gelu'(x + bias) from the saved input, so nothing but the input is kept; the bias gradient is
summed over rows in float32. The "torch" backend is the reference: F.gelu(input + bias), for
eager and compiled torch alike.

linear_gelu is the first half of a Transformer MLP, gelu(linear(input, weight, bias)), for a float
or quantized weight: on fastlm backends the bias add leaves the matmul for the GELU kernel.

    silu_mul(gate, up, *, backend=None)

silu_mul is the activation of a SwiGLU MLP, silu(gate) * up, for gate and up of one shape and dtype,
from one pass over memory forward (read gate and up, write y) and one backward (read gate, up and dy,
write both gradients; the sigmoid is recomputed, so only the inputs are saved). Torch's eager form
runs silu, then the product, and three kernels backward. Inputs with a unit last-dim stride whose
leading dims flatten to one row stride, such as the halves `gate_up.chunk(2, -1)` of a fused
projection, reach the kernels without a copy; any other layout is copied first. The kernel ops are
torch.ops.fastlm.silu_mul_fwd and torch.ops.fastlm.silu_mul_bwd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._dispatch import kernel_op
from fastlm.ops.quant_matmul import quant_linear
from fastlm.quant import QuantizedWeight

APPROXIMATIONS = ("none", "tanh")

# --- the kernels -------------------------------------------------------------------------------


@kernel_op("activation")
def bias_gelu_fwd(lib, x: Tensor, bias: Tensor | None, tanh: bool) -> Tensor:
    """gelu(x + bias) for x of shape (M, N); see csrc/fastlm.h for the full contract."""
    return lib.bias_gelu_fwd(x, bias, tanh)


@bias_gelu_fwd.register_fake
def _(x, bias, tanh):
    return torch.empty_like(x)


@kernel_op("activation")
def bias_gelu_bwd(lib, dy: Tensor, x: Tensor, bias: Tensor | None, tanh: bool, need_dbias: bool
                  ) -> tuple[Tensor, Tensor]:
    """(dx, dbias in bias's dtype, or empty without need_dbias) of bias_gelu_fwd."""
    dx, db = lib.bias_gelu_bwd(dy, x, bias, tanh, need_dbias)
    # The kernels sum in float32; the gradient of a parameter comes back in its own dtype.
    return dx, (db.to(bias.dtype) if need_dbias and bias is not None else x.new_empty((0,)))


@bias_gelu_bwd.register_fake
def _(dy, x, bias, tanh, need_dbias):
    db = x.new_empty((x.shape[1],), dtype=bias.dtype) if need_dbias and bias is not None else x.new_empty((0,))
    return torch.empty_like(x), db


def _setup_context(ctx, inputs, output):
    x, bias, tanh = inputs
    ctx.save_for_backward(x, bias)
    ctx.tanh = tanh


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]
    dx, db = bias_gelu_bwd.via(ctx)(dy.contiguous(), x, bias, ctx.tanh, need_dbias)
    return dx, (db if need_dbias else None), None


bias_gelu_fwd.register_autograd(_setup_context, _backward)

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
    return bias_gelu_fwd(x2, b, approximate == "tanh", backend=backend).view(input.shape)


def linear_gelu(
    input: Tensor, weight: Tensor | QuantizedWeight, bias: Tensor | None = None, approximate: str = "tanh", *,
    backend: str | None = None,
) -> Tensor:
    """gelu(F.linear(input, weight, bias)) for a float weight (N, K) or a fastlm.quant.QuantizedWeight.

    On the torch backend the bias is added inside the matmul, as nn.Linear does (the reference); on
    the fastlm backends the matmul runs without it and bias_gelu adds it, which saves the pass over
    the (M, N) output that a separate bias add costs."""
    quantized = isinstance(weight, QuantizedWeight)
    if not quantized:
        _checks.tensor("linear_gelu", "weight", weight)
    chosen = backends.choose("linear_gelu", input.device, backend)
    if chosen == "torch":
        h = quant_linear(input, weight, bias, backend=chosen) if quantized else F.linear(input, weight, bias)
        return F.gelu(h, approximate=approximate)
    h = quant_linear(input, weight, backend=chosen) if quantized else F.linear(input, weight)
    return bias_gelu(h, bias, approximate, backend=chosen)


# --- silu_mul ---------------------------------------------------------------------------------


@kernel_op("activation")
def silu_mul_fwd(lib, gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for gate and up (M, N), unit column stride; see csrc/fastlm.h."""
    return lib.silu_mul_fwd(gate, up)


def _fake_check(op: str, gate: Tensor, up: Tensor, dy: Tensor | None = None) -> None:
    """What the kernels check, for the fake: tensors on two devices (one of them meta) reach the
    fake rather than a kernel, which would otherwise hand back an empty tensor for a broken call."""
    for name, t in (("up", up), ("dy", dy)):
        if t is not None and (t.device != gate.device or t.shape != gate.shape or t.dtype != gate.dtype):
            raise RuntimeError(f"{op}: {name} ({t.dtype} {tuple(t.shape)} on {t.device}) must match gate "
                               f"({gate.dtype} {tuple(gate.shape)} on {gate.device})")


@silu_mul_fwd.register_fake
def _(gate, up):
    _fake_check("silu_mul_fwd", gate, up)
    return gate.new_empty(gate.shape)


@kernel_op("activation")
def silu_mul_bwd(lib, dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of silu_mul_fwd, contiguous, from one pass over dy, gate and up."""
    return lib.silu_mul_bwd(dy, gate, up)


@silu_mul_bwd.register_fake
def _(dy, gate, up):
    _fake_check("silu_mul_bwd", gate, up, dy)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _silu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return silu_mul_bwd.via(ctx)(_rows(dy, dy.shape[-1]), gate, up)


silu_mul_fwd.register_autograd(_silu_setup_context, _silu_backward)


def _rows(t: Tensor, n: int) -> Tensor:
    """t as (M, n) rows the kernels read in place (unit column stride, rows apart), else a copy."""
    v = t.reshape(-1, n)  # a view where the leading dims flatten to one stride, else a copy
    if (n <= 1 or v.stride(1) == 1) and (v.shape[0] <= 1 or v.stride(0) >= n):
        return v
    return v.contiguous()


def _check_silu_mul(gate, up) -> None:
    _checks.tensor("silu_mul", "gate", gate)
    if gate.dim() < 1:
        raise ValueError("silu_mul: gate must have at least one dimension, got a 0-d tensor")
    _checks.like("silu_mul", "up", up, gate, "gate", shape=gate.shape)


def silu_mul(gate: Tensor, up: Tensor, *, backend: str | None = None) -> Tensor:
    """silu(gate) * up (the SwiGLU activation) for gate and up of one shape and dtype."""
    _check_silu_mul(gate, up)
    backend = backends.choose("silu_mul", gate.device, backend)
    if backend == "torch" or gate.numel() == 0:
        return F.silu(gate) * up
    _checks.backend_dtype("silu_mul", backend, gate)
    n = gate.shape[-1]
    return silu_mul_fwd(_rows(gate, n), _rows(up, n), backend=backend).view(gate.shape)
