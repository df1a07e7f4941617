"""Weight-only quantized linear: F.linear with an int8 or int4 weight.

    quant_linear(input, weight: QuantizedWeight, bias=None, *, backend=None)

`weight` is a fastlm.quant.QuantizedWeight (the format is documented in fastlm/quant.py);
input (..., K) may have any leading dims, and the result is (..., N) in input's dtype. bias, when
given, is cast to input's dtype. The kernels never make a float copy of the weight: they read
the packed bytes and multiply in float32.

Every backend but "torch" runs the kernel op (fastlm/ops/_dispatch.py) registered as
torch.ops.fastlm.quant_matmul, over the input flattened to (M, K). The "torch" backend is the
reference: dequantize, then F.linear.

With act_quant=True the CPU backend quantizes the input too: to int8 per block of 32 along K
(d = absmax / 127, the rows of x separately) once per call, and multiplies in int32
(torch.ops.fastlm.quant_matmul_dot; csrc/cpu/quant_dot.h). That adds the input's rounding,
at most d / 2 per element (README, "Quantization", has the measured error), and is what makes
the matmul memory-bound at small M. It runs for K a multiple of 32 and M <= 64, or any M where
the kernels take many rows of x at once and beat the float path at every M measured: int4 on the
256-bit kernels (AVX2, AVX-VNNI: 8 rows), int4 and int8 on the 512-bit ones (AVX-512 VNNI: 16);
larger M otherwise, and every other backend, take the float path, whose result does not depend
on act_quant.

Scales (and zeros) may be bfloat16 or float16 (fastlm/quant.py): the integer CPU kernel reads
them as stored; the float paths widen them to float32 first.

Backward gives the input gradient dx = dy dequant(W), computed in torch by dequantizing the
weight (in dy's dtype) and a dense matmul, and the bias gradient when the bias needs one. The
packed weight is a constant: it gets no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends, quant
from fastlm.ops import _checks
from fastlm.ops._dispatch import kernel_op
from fastlm.quant import QuantizedWeight

# The input dtypes each backend computes with: the CPU kernel takes float32 and bfloat16 only.
DTYPES = {**_checks.BACKEND_DTYPES, "torch": _checks.FLOAT_DTYPES, "cpu": (torch.float32, torch.bfloat16)}


def _dequant(qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int,
             dtype: torch.dtype) -> Tensor:
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    qw = QuantizedWeight(qweight, scales, zeros, bits, group_size, (qweight.shape[0], k))
    return quant.dequantize(qw, dtype)


@kernel_op("quant_matmul")
def quant_matmul(
    lib, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
    bits: int, group_size: int,
) -> Tensor:
    """x (M, K) dequant(W)^T + bias: (M, N) in x's dtype; see csrc/fastlm.h for the contract."""
    return lib.quant_matmul(x, qweight, scales, zeros, bias, bits, group_size)


@kernel_op("quant_matmul")
def quant_matmul_dot(
    lib, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
    bits: int, group_size: int,
) -> Tensor:
    """quant_matmul with x quantized to int8 per block of 32 and integer dot products (CPU only)."""
    return lib.quant_matmul_dot(x, qweight, scales, zeros, bias, bits, group_size)


def _fake(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


quant_matmul.register_fake(_fake)
quant_matmul_dot.register_fake(_fake)

# The largest M the integer kernel takes: past it the float path's blocked GEMM, which reuses
# each dequantized weight tile across 128 rows of x, is as fast (fastlm/bench/quant_matmul.py).
# Not where the kernels take many rows of x at once: int4 on the 256-bit kernels (8 rows; AMD EPYC
# Zen 3, 2 threads, 4096 x 4096 g32, M = 64 / 512 / 2048: 8.8 / 70 / 318 ms against the float
# path's 19 / 112 / 418; int8 there: 12.4 / 98 / 413 against 18 / 113 / 412, so int8 keeps the
# bound), and int4 and int8 on the 512-bit kernels (16 rows; AMD EPYC Zen 4, 2 threads, 4096 x
# 4096, M = 128 / 512 / 2048: int4 g32 9.8 / 38 / 201 ms, int8 9.0 / 36 / 221, against the float
# path's 34 / 109 / 439 and 33 / 104 / 501).
DOT_MAX_M = 64


def _dot_takes(m: int, bits: int) -> bool:
    if m <= DOT_MAX_M:
        return True
    return bits == 4 or backends.quant_isa() == "avx512_vnni"


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    qweight, scales, zeros = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = dy @ _dequant(qweight, scales, zeros, ctx.bits, ctx.group_size, dy.dtype)
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
    return dx, None, None, None, db, None, None


quant_matmul.register_autograd(_setup_context, _backward)
quant_matmul_dot.register_autograd(_setup_context, _backward)

# --- the public function ----------------------------------------------------------------------


def _check(op: str, input, weight, bias) -> None:
    _checks.tensor(op, "input", input)
    quant.check_format(op, weight)
    n, k = weight.shape
    if input.dim() == 0 or input.shape[-1] != k:
        raise ValueError(f"{op}: input's last dim must be in_features = {k}, got input of shape {tuple(input.shape)}")
    if weight.device != input.device:
        raise ValueError(f"{op}: weight is on {weight.device} but input is on {input.device}")
    if bias is not None:
        _checks.like(op, "bias", bias, input, "input", shape=(n,), same_dtype=False)


def quant_linear(input: Tensor, weight: QuantizedWeight, bias: Tensor | None = None, *,
                 backend: str | None = None, act_quant: bool = False) -> Tensor:
    """torch.nn.functional.linear with a quantized weight, on the chosen backend; act_quant: the
    CPU backend's integer path (see the module docstring)."""
    op = "quant_linear"
    _check(op, input, weight, bias)
    backend = backends.choose(op, input.device, backend)
    _checks.backend_dtype(op, backend, input, DTYPES)
    if bias is not None and bias.dtype != input.dtype:
        bias = bias.to(input.dtype)
    n, k = weight.shape
    if backend == "torch" or input.numel() == 0:
        return F.linear(input, quant.dequantize(weight, input.dtype), bias)
    # Plain calls where they do nothing: at decode sizes this function's own cost shows.
    x2 = (input if input.dim() == 2 else input.reshape(-1, k)).contiguous()
    scales, zeros = weight.scales, weight.zeros
    dot = act_quant and backend == "cpu" and k % 32 == 0 and _dot_takes(x2.shape[0], weight.bits)
    if not dot and scales.dtype != torch.float32:
        scales, zeros = scales.float(), None if zeros is None else zeros.float()
    args = (x2, weight.qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(),
            None if bias is None else bias.contiguous(), weight.bits, weight.group_size)
    y = (quant_matmul_dot if dot else quant_matmul)(*args, backend=backend)
    return y if input.dim() == 2 else y.view(*input.shape[:-1], n)
