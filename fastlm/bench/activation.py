"""Benchmark cases for bias_gelu (the MLP activation, fused with the bias add before it) and
silu_mul (the SwiGLU activation, silu(gate) * up).

Bytes per pass (the bias is negligible beside the activations):
    forward          read x, write y            2 * M * N * itemsize
    backward         read x and dy, write dx    3 * M * N * itemsize
    forward+backward                            5 * M * N * itemsize
Unfused torch moves more (x + b is written and read back); the rates count only what a pass must.

silu_mul, per element:
    forward          read gate and up, write y                      3 * itemsize
    backward         read gate, up and dy, write dgate and dup      5 * itemsize
    forward+backward                                                8 * itemsize
Torch's eager form moves 7 forward (silu writes s and reads it back) and about 14 forward+backward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastlm import backends, ops
from fastlm.bench.harness import Case

CPU_SHAPES = ((512, 2048), (4096, 3072))
CPU_QUICK = ((512, 2048),)
CUDA_SHAPES = ((8192, 3072), (8192, 4096), (16384, 8192))
CUDA_QUICK = ((8192, 3072),)
SILU_CPU_SHAPES = ((1024, 2816), (4096, 4096))
SILU_CUDA_SHAPES = ((8192, 11008), (16384, 14336))


def _torch_fn(x, b):
    return F.gelu(x + b, approximate="tanh")


def _fastlm_fn(backend: str):
    return lambda x, b: ops.bias_gelu(x, b, "tanh", backend=backend)


def _make(m: int, n: int, dtype: torch.dtype, device: torch.device):
    x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    return x, torch.randn(n, device=device, dtype=dtype, requires_grad=True)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    item = torch.finfo(dtype).bits // 8
    if device.type == "cpu":
        shapes = CPU_QUICK if quick else CPU_SHAPES
    else:
        shapes = CUDA_QUICK if quick else CUDA_SHAPES
    out = []
    for m, n in shapes:
        impls = {f"fastlm-{b}": _fastlm_fn(b) for b in backends.available(device.type) if b != "torch"}
        impls["torch"] = _torch_fn
        impls["torch.compile"] = torch.compile(_torch_fn, dynamic=False)
        size = m * n * item
        out.append(Case(
            op="activation", name=f"bias_gelu {m}x{n}", shape=(m, n), dtype=dtype,
            make=functools.partial(_make, m, n, dtype, device), impls=impls,
            work={"fwd": 2 * size, "bwd": 3 * size, "fwdbwd": 5 * size},
        ))
    return out + _silu_cases(device, dtype, quick)


def _silu_torch(g, u):
    return F.silu(g) * u


def _silu_fastlm(backend: str):
    return lambda g, u: ops.silu_mul(g, u, backend=backend)


def _silu_make(m: int, n: int, dtype: torch.dtype, device: torch.device):
    return tuple(torch.randn(m, n, device=device, dtype=dtype, requires_grad=True) for _ in range(2))


def _silu_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    shapes = SILU_CPU_SHAPES if device.type == "cpu" else SILU_CUDA_SHAPES
    item = torch.finfo(dtype).bits // 8
    out = []
    for m, n in shapes[:1] if quick else shapes:
        impls = {f"fastlm-{b}": _silu_fastlm(b) for b in backends.available(device.type) if b != "torch"}
        impls["torch"] = _silu_torch
        impls["torch.compile"] = torch.compile(_silu_torch, dynamic=False)
        size = m * n * item
        out.append(Case(
            op="activation", name=f"silu_mul {m}x{n}", shape=(m, n), dtype=dtype,
            make=functools.partial(_silu_make, m, n, dtype, device), impls=impls,
            work={"fwd": 3 * size, "bwd": 5 * size, "fwdbwd": 8 * size},
        ))
    return out
