"""Benchmark cases for bias_gelu (the MLP activation, fused with the bias add before it).

Bytes per pass (the bias is negligible beside the activations):
    forward          read x, write y            2 * M * N * itemsize
    backward         read x and dy, write dx    3 * M * N * itemsize
    forward+backward                            5 * M * N * itemsize
Unfused torch moves more (x + b is written and read back); the rates count only what a pass must.
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
    return out
