"""Benchmark cases for embedding lookup at a GPT-2 shape and a large-model shape, 8x1024 ids.

Bytes per pass, for n ids, a (V, D) table and itemsize s:
    forward          read n rows, write n rows                          2 * n * D * s
    backward         write the dense (V, D) gradient once, read the n
                     gradient rows, read and write n table rows         (V + 3 n) * D * s
    forward+backward the sum
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastlm import backends, ops
from fastlm.bench.harness import Case

IDS = (8, 1024)
TABLES = ((50304, 768), (32000, 4096))


def _make(v: int, d: int, dtype: torch.dtype, device: torch.device):
    ids = torch.randint(0, v, IDS, device=device)
    return ids, torch.randn(v, d, device=device, dtype=dtype, requires_grad=True)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    s = torch.finfo(dtype).bits // 8
    n = IDS[0] * IDS[1]
    out = []
    for v, d in TABLES[:1] if quick else TABLES:
        impls = {
            f"fastlm-{b}": functools.partial(lambda ids, w, b: ops.embedding(ids, w, backend=b), b=b)
            for b in backends.available(device.type) if b != "torch"
        }
        impls["torch"] = F.embedding
        impls["torch.compile"] = torch.compile(F.embedding, dynamic=False)
        fwd, bwd = 2 * n * d * s, (v + 3 * n) * d * s
        out.append(Case(
            op="embedding", name=f"embedding {v}x{d}", shape=(n, v, d), dtype=dtype,
            make=functools.partial(_make, v, d, dtype, device), impls=impls,
            work={"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd},
        ))
    return out
