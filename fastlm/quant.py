"""Weight-only quantization: the packed format, quantize / dequantize (no modules).

    qw = fastlm.quant.quantize(linear.weight, bits=4, group_size=128)
    y = fastlm.ops.quant_linear(x, qw, linear.bias)
    fastlm.quantize_(model, bits=4)          # every nn.Linear becomes a fastlm.nn.QuantLinear (patch.py)

The format (every backend reads exactly this; csrc/fastlm.h states the same contract)
--------------------------------------------------------------------------------------
A float weight W of shape (N, K) (out_features, in_features, as in nn.Linear) is stored as

    qweight   the quantized values, row n holding output channel n
    scales    (N, K // group_size): one scale per group of group_size consecutive k, float32,
              or bfloat16 / float16 ("16-bit scales", quantize(scale_dtype=...)): int4 g32 then
              moves 4.5 bits per weight instead of 5
    zeros     (N, K // group_size) zero points in scales' dtype, or None (symmetric: implicit zero)
    W[n, k] = (q[n, k] - zero[n, k // group_size]) * scales[n, k // group_size]

int8 (bits=8): symmetric, per output channel, so group_size == K and scales is (N, 1).
    qweight is int8 (N, K) with q = round(W / s) in [-127, 127], s = absmax(W[n, :]) / 127;
    the zero is 0 and zeros is None.

int4 (bits=4): in groups of group_size consecutive k (32, 64 or 128; K must be divisible by
    group_size). Values are unsigned, 0..15, two to a byte:
        qweight  uint8 (N, K // 2); element k of row n is in byte k // 2,
                 in the LOW nibble for even k and the HIGH nibble for odd k:
                 qweight[n, j] = q[n, 2j] | (q[n, 2j + 1] << 4)
    symmetric (zeros None): s = absmax(group) / 7, q = clamp(round(W / s), -8, 7) + 8,
        i.e. an implicit zero of 8.
    asymmetric: over a group's range [lo, hi] widened to contain 0, s = (hi - lo) / 15 and the
        zero z = round(-lo / s) in 0..15 (an integer, stored as float32 so that 0 stays exact);
        q = clamp(round(W / s) + z, 0, 15).

Either way every weight is within half a scale of its dequantized value: |W - dequant| <= s / 2
(up to float rounding). With 16-bit scales the scale is rounded to its dtype first and q computed
against the rounded scale, so the bound holds with the stored s (a group's largest weight moves
at most 7 or 127 times the scale's rounding, 2^-8 of it for bf16, still under half a step).
fp16 scales need every scale within fp16's range: quantize raises otherwise. A group whose
weights are all zero gets scale 1, so dequantizes to exact zeros.

Non-finite weights are not an error but stay visible: a group holding a NaN or an infinity gets
a NaN or infinite scale (its stored values are 0), so the whole group dequantizes to NaN, and
every output a matmul computes from it is NaN, as it would be from the float weight (where an
infinity alone could give +-inf, the quantized weight gives NaN). Quantizing never turns them
into finite numbers.

This module sits below fastlm.ops and imports nothing of fastlm: the ops and modules read the
format from here, and `fastlm.quantize_`, which swaps modules, lives with fastlm.patch.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = ["QuantizedWeight", "quantize", "dequantize", "check_format", "GROUP_SIZES"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The int4 group sizes every backend runs (the CPU kernel would take any divisor of K).
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized (N, K) weight in the format above."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]   # (N, K) = (out_features, in_features)
    # The float dtype of the weight it stands for, read by code that sizes buffers after a layer's
    # weight (a KV cache after its projection's); not the stored values' dtype.
    dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> QuantizedWeight:
        move = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(self, qweight=move(self.qweight), scales=move(self.scales), zeros=move(self.zeros))

    def nbytes(self) -> int:
        """Bytes a matmul reads for this weight: values, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def check_params(op: str, bits, group_size, k: int | None = None) -> int:
    """Validate bits and group_size (for in_features k when given); returns the group size,
    which for int8 is always k (per output channel)."""
    if bits not in (4, 8):
        raise ValueError(f"{op}: bits must be 4 or 8, got {bits!r}")
    if bits == 8:
        return k if k is not None else group_size
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: int4 group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if k is not None:
        if k % 2:
            raise ValueError(f"{op}: int4 packs two values per byte, so in_features must be even, got {k}")
        if k % group_size:
            raise ValueError(f"{op}: group_size {group_size} must divide in_features {k}")
    return group_size


def check_format(op: str, qw) -> None:
    """Raise if qw is not a consistent QuantizedWeight (dtypes, shapes, devices)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{op}: weight must be a fastlm.quant.QuantizedWeight, got {type(qw).__name__}")
    n, k = qw.shape
    g = check_params(op, qw.bits, qw.group_size, k)
    if qw.bits == 8 and qw.group_size != k:
        raise ValueError(f"{op}: int8 weights are per output channel: group_size must be {k}, got {qw.group_size}")
    want_q = (torch.int8, (n, k)) if qw.bits == 8 else (torch.uint8, (n, k // 2))
    if qw.qweight.dtype != want_q[0] or tuple(qw.qweight.shape) != want_q[1]:
        raise ValueError(f"{op}: qweight must be {want_q[0]} of shape {want_q[1]}, "
                         f"got {qw.qweight.dtype} of shape {tuple(qw.qweight.shape)}")
    for name, t in (("scales", qw.scales), ("zeros", qw.zeros)):
        if t is None:
            continue
        if t.dtype not in SCALE_DTYPES or tuple(t.shape) != (n, k // g):
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16 of shape {(n, k // g)}, "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
        if t.dtype != qw.scales.dtype:
            raise ValueError(f"{op}: zeros must have scales' dtype {qw.scales.dtype}, got {t.dtype}")
        if t.device != qw.qweight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but qweight is on {qw.qweight.device}")
    if qw.bits == 8 and qw.zeros is not None:
        raise ValueError(f"{op}: int8 weights are symmetric: zeros must be None")


def _round_scales(s: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """s rounded to scale_dtype and back to float32, for q to be computed against the stored scale."""
    if scale_dtype == torch.float32:
        return s
    r = s.to(scale_dtype)
    bad = (r == 0) | (r.isinf() & s.isfinite())
    if bool(bad.any()):
        raise ValueError(f"quantize: a scale ({float(s[bad].flatten()[0]):.3g}) is outside {scale_dtype}'s range; "
                         "use scale_dtype=torch.bfloat16 or torch.float32")
    return r.float()


def quantize(weight: Tensor, bits: int = 8, group_size: int = 128, symmetric: bool = True,
             scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize a float (N, K) weight. For bits=8, group_size is ignored (per output channel)
    and only symmetric quantization exists. scale_dtype: float32, or bfloat16 / float16 for
    16-bit scales (and zeros)."""
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"quantize: scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"quantize: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT:
        raise TypeError(f"quantize: weight must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k == 0:
        raise ValueError("quantize: weight has no columns (in_features is 0)")
    group_size = check_params("quantize", bits, group_size, k)
    if bits == 8 and not symmetric:
        raise ValueError("quantize: int8 is symmetric per output channel; asymmetric quantization needs bits=4")
    w = weight.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if symmetric:
        qmin, qmax = (-127, 127) if bits == 8 else (-8, 7)
        s = w.abs().amax(-1, keepdim=True) / qmax
        # `s == 0`, not `s > 0`: a NaN scale must stay NaN (see "Non-finite weights" above).
        s = _round_scales(torch.where(s == 0, torch.ones_like(s), s), scale_dtype)
        # NaN -> 0: casting NaN to an integer is undefined; the scale carries the NaN.
        q = torch.clamp(torch.round(w / s), qmin, qmax).nan_to_num_(0.0)
        if bits == 8:
            return QuantizedWeight(q.reshape(n, k).to(torch.int8).contiguous(),
                                   s.reshape(n, 1).to(scale_dtype).contiguous(),
                                   None, 8, k, (n, k), weight.dtype)
        q = q + 8
        z = None
    else:
        lo = w.amin(-1, keepdim=True).clamp(max=0)
        hi = w.amax(-1, keepdim=True).clamp(min=0)
        s = (hi - lo) / 15
        s = _round_scales(torch.where(s == 0, torch.ones_like(s), s), scale_dtype)
        z = torch.clamp(torch.round(-lo / s), 0, 15)
        q = torch.clamp(torch.round(w / s) + z, 0, 15).nan_to_num_(0.0)
    q = q.reshape(n, k).to(torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    groups = k // group_size  # not -1: a weight of no rows has no size to infer
    return QuantizedWeight(packed, s.reshape(n, groups).to(scale_dtype).contiguous(),
                           None if z is None else z.reshape(n, groups).to(scale_dtype).contiguous(), 4, group_size,
                           (n, k), weight.dtype)


def unpack(qw: QuantizedWeight) -> Tensor:
    """The stored values q as int16 (N, K): int8 as is, int4 unsigned 0..15."""
    if qw.bits == 8:
        return qw.qweight.to(torch.int16)
    p = qw.qweight.to(torch.int16)
    return torch.stack((p & 15, p >> 4), dim=-1).reshape(qw.shape)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float (N, K) weight the quantized one stands for, computed in float32 (float64 when
    asked for), then cast to dtype."""
    check_format("dequantize", qw)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n, k = qw.shape
    g = qw.group_size
    q = unpack(qw).to(work).reshape(n, k // g, g)
    if qw.zeros is not None:
        z = qw.zeros.to(work).unsqueeze(-1)
    else:
        z = 8.0 if qw.bits == 4 else 0.0
    w = (q - z) * qw.scales.to(work).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def ideal_speedup(n: int, k: int, bits: int, group_size: int, symmetric: bool = True,
                  dense_bytes_per_value: int = 4, scale_bytes: int = 4) -> float:
    """Dense weight bytes over quantized weight bytes: the most a memory-bound matmul can gain."""
    groups = k // (k if bits == 8 else group_size)
    q = n * k * bits / 8 + n * groups * scale_bytes * (1 if symmetric else 2)
    return n * k * dense_bytes_per_value / q if q else math.inf
