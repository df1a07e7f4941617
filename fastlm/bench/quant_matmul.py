"""Benchmark cases for the weight-only quantized linear: y = x W^T, K = N = 4096, M rows of x;
and, in full runs, the four linear layers of a gpt2-preset block (qkv 2304x768, attention output
768x768, MLP 3072x768 and 768x3072) at M = 1 and 16.

A quantized linear layer exists to read fewer weight bytes, so bytes are the metric and copy
bandwidth the ceiling. Each competitor is credited with what it must move:
    dense float       N K s                       (s = 4 for float32, 2 for bfloat16)
    int8              N K + 4 N                   (values, one scale per row)
    int4, group G     N K / 2 + 4 N K / G         (twice the second term with zero points)
    plus, for all     M (K + N) s                 (x in, y out)
Competitors: "torch" is the dense float layer that the quantized one replaces (F.linear with the
float weight), so the table's "x eager" column is the speedup over the dense matmul. The case name
ends with the ideal speedup in parentheses, dense weight bytes over quantized weight bytes:
what a purely memory-bound kernel would gain. The fraction of that ideal reached is "x eager" over it, which is
also the ratio of the two competitors' GB/s. torch's own weight-only kernels run where this
torch has them, for M <= 8: torch._weight_int8pack_mm and, on the CPU,
torch._weight_int4pack_mm_for_cpu (measured 3-40x slower than the dense matmul here).

Only the forward pass is timed: the packed weight gets no gradient, and the input gradient is a
dense matmul in torch. Every competitor cycles through enough copies of its weight that together
they exceed the last-level cache three times over, so each call reads its weight from memory, as
a model whose layers each run once per token does. Each turn of the interleaved timing runs a
competitor four times in a row and keeps the last three (harness.interleaved_ms): a model runs
its quantized layers one after another, never right after a dense matmul of the same shape.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import torch
import torch.nn.functional as F

from fastlm import backends, ops, quant
from fastlm.bench.harness import Case

K = N = 4096
MS = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_MS = (1, 16)
# (bits, group_size, symmetric)
CONFIGS = ((8, K, True), (4, 128, True), (4, 128, False))
QUICK_CONFIGS = CONFIGS[:2]
# The four linear layers of a block of the thin model's gpt2 preset, (N, K); full runs only.
MODEL_SHAPES = {"qkv": (2304, 768), "attn-out": (768, 768), "mlp-in": (3072, 768), "mlp-out": (768, 3072)}


def _llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    try:  # the largest cache the kernel reports for cpu0
        sizes = []
        for i in itertools.count():
            try:
                with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                    text = f.read().strip()
            except OSError:
                break
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KM")) * mult)
        return max(sizes) if sizes else 32 << 20
    except ValueError:
        return 32 << 20


def _copies(nbytes: int, device: torch.device) -> int:
    return max(2, math.ceil(3 * _llc_bytes(device) / nbytes))


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, tuple):
        return tuple(_clone(t) for t in v)
    if isinstance(v, quant.QuantizedWeight):
        return dataclasses.replace(v, qweight=v.qweight.clone(), scales=v.scales.clone(),
                                   zeros=None if v.zeros is None else v.zeros.clone())
    raise TypeError(type(v).__name__)


class _Ring:
    """Copies of one weight (a tensor, a tuple of them or a QuantizedWeight), handed out in turn."""

    def __init__(self, first, nbytes: int, device: torch.device):
        self.items = [first] + [_clone(first) for _ in range(_copies(nbytes, device) - 1)]
        self._next = itertools.cycle(self.items)

    def next(self):
        return next(self._next)


@functools.cache
def _weights(bits: int, group: int, sym: bool, dtype: torch.dtype, device: torch.device, n: int = N, k: int = K):
    """Rings of the (n, k) weight for every competitor, shared by the cases of each M; and the
    quantized weight's bytes."""
    w = torch.randn(n, k, device=device, dtype=torch.float32)
    qw = quant.quantize(w, bits, group, sym)
    rings = {"dense": _Ring(w.to(dtype), n * k * torch.finfo(dtype).bits // 8, device),
             "fastlm": _Ring(qw, qw.nbytes(), device)}
    if bits == 8 and hasattr(torch, "_weight_int8pack_mm"):
        rings["int8pack"] = _Ring((qw.qweight, qw.scales[:, 0].to(dtype).contiguous()), qw.nbytes(), device)
    if bits == 4 and device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        try:
            q = quant.unpack(qw).to(torch.int32)
            # torch's int4 format: W = (q - 8) * scale + offset, scales and offsets (K / G, N, 2).
            off = torch.zeros_like(qw.scales) if qw.zeros is None else (8 - qw.zeros) * qw.scales
            sz = torch.stack((qw.scales, off), -1).transpose(0, 1).contiguous().to(dtype)
            rings["int4pack"] = _Ring((torch._convert_weight_to_int4pack_for_cpu(q, 1), sz), qw.nbytes(), device)
        except (RuntimeError, NotImplementedError):
            pass
    return rings, qw.nbytes()


def _with_group(packed_and_sz, group):
    packed, sz = packed_and_sz
    return packed, group, sz


def _make(m: int, k: int, dtype: torch.dtype, device: torch.device):
    return (torch.randn(m, k, device=device, dtype=dtype),)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = []
    for bits, group, sym in QUICK_CONFIGS if quick else CONFIGS:
        out += _cases(device, dtype, bits, group, sym, "", N, K, QUICK_MS if quick else MS)
    if not quick:
        for label, (n, k) in MODEL_SHAPES.items():
            for bits, group, sym in CONFIGS[:2]:
                out += _cases(device, dtype, bits, group, sym, f"gpt2 {label} {n}x{k} ", n, k, (1, 16))
    return out


def _cases(device, dtype, bits, group, sym, prefix, n, k, ms) -> list[Case]:
    s = torch.finfo(dtype).bits // 8
    out = []
    rings, qbytes = _weights(bits, group, sym, dtype, device, n, k)
    kind = "int8" if bits == 8 else f"int4/{group}{'' if sym else ' asym'}"
    ideal = n * k * s / qbytes
    for m in ms:
        impls = {"torch": lambda x, r=rings["dense"]: F.linear(x, r.next())}
        for b in backends.available(device.type):
            if b != "torch":
                impls[f"fastlm-{b}"] = lambda x, r=rings["fastlm"], b=b: ops.quant_linear(x, r.next(), backend=b)
        # torch's packed kernels take seconds a call at large M on the CPU: decode sizes only.
        if "int8pack" in rings and m <= 8:
            impls["torch int8pack"] = lambda x, r=rings["int8pack"]: torch._weight_int8pack_mm(x, *r.next())
        if "int4pack" in rings and m <= 8:
            impls["torch int4pack"] = lambda x, r=rings["int4pack"], g=group: torch._weight_int4pack_mm_for_cpu(
                x, *_with_group(r.next(), g))
        io = m * (k + n) * s
        work = {name: {"fwd": io + (n * k * s if name == "torch" else qbytes)} for name in impls}
        out.append(Case(
            op="quant_matmul", name=f"{prefix}{kind} M={m} ({ideal:.1f}x)", shape=(m, k, n), dtype=dtype,
            make=functools.partial(_make, m, k, dtype, device), impls=impls,
            work={"fwd": io + qbytes}, impl_work=work, passes=("fwd",), burst=4,
        ))
    return out
