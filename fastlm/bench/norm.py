"""Benchmark cases for layer_norm and rms_norm at the shapes of real models.

Bytes per pass (the weights are negligible beside the activations):
    forward          read x, write y            2 * M * N * itemsize
    backward         read x and dy, write dx    3 * M * N * itemsize
    forward+backward                            5 * M * N * itemsize
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastlm import backends, ops
from fastlm.bench.harness import Case

ROWS = 8192
HIDDEN = (768, 1024, 2048, 4096)


def _torch_fn(kind: str, n: int):
    if kind == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (n,), w, b)
    return lambda x, w: F.rms_norm(x, (n,), w)


def _fastlm_fn(kind: str, n: int, backend: str):
    if kind == "layer_norm":
        return lambda x, w, b: ops.layer_norm(x, (n,), w, b, backend=backend)
    return lambda x, w: ops.rms_norm(x, (n,), w, backend=backend)


def _make(kind: str, n: int, dtype: torch.dtype, device: torch.device):
    x = torch.randn(ROWS, n, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    if kind == "layer_norm":
        return x, w, torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    return x, w


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    item = torch.finfo(dtype).bits // 8
    out = []
    for kind in ("layer_norm", "rms_norm"):
        for n in (1024,) if quick else HIDDEN:
            impls = {
                f"fastlm-{b}": _fastlm_fn(kind, n, b)
                for b in backends.available(device.type) if b != "torch"
            }
            impls["torch"] = _torch_fn(kind, n)
            impls["torch.compile"] = torch.compile(_torch_fn(kind, n), dynamic=False)
            size = ROWS * n * item
            out.append(Case(
                op="norm", name=f"{kind} {ROWS}x{n}", shape=(ROWS, n), dtype=dtype,
                make=functools.partial(_make, kind, n, dtype, device), impls=impls,
                work={"fwd": 2 * size, "bwd": 3 * size, "fwdbwd": 5 * size},
            ))
    return out
