"""Benchmark cases for rotary_embedding (RoPE of q and k, GQA shapes).

Bytes per pass (q and k each read once and written once; the tables are small beside them):
    forward          read q, k, cos, sin; write q', k'      2 * (q + k) + tables
    backward         read dq', dk', cos, sin; write dq, dk  the same
    forward+backward                                        twice that
The eager competitor is transformers' formula, `x * cos + rotate_half(x) * sin` with rotate_half
built by torch.cat (transformers' own apply_rotary_pos_emb when it is installed), which makes
several passes; "rope positions" is fastlm's form without tables, angles made in the kernel.
"""

from __future__ import annotations

import functools

import torch

from fastlm import backends, ops
from fastlm.bench.harness import Case

# (B, Hq, Hk, T, D): a Llama-style layer (32 query heads, 8 key/value heads) and a smaller one.
CPU_SHAPES = ((8, 32, 8, 512, 128), (4, 12, 4, 256, 64))
CPU_QUICK = ((4, 12, 4, 256, 64),)
CUDA_SHAPES = ((8, 32, 8, 2048, 128), (8, 32, 8, 512, 128))
CUDA_QUICK = ((8, 32, 8, 512, 128),)


def _hf_apply():
    """transformers' apply_rotary_pos_emb, or the same formula written out when it is absent."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        return apply_rotary_pos_emb, "transformers"
    except ImportError:
        def rotate_half(x):
            return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        return apply_rotary_pos_emb, "transformers' formula"


def _make(shape, dtype, device):
    b, hq, hk, t, d = shape
    q = torch.randn(b, hq, t, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, t, d, device=device, dtype=dtype, requires_grad=True)
    pos = torch.arange(t, device=device)
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    ang = torch.outer(pos.float(), inv)
    ang = torch.cat((ang, ang), -1)[None].expand(b, -1, -1)
    # transformers hands (B, T, D) tables in the model's dtype to every layer.
    return q, k, ang.cos().to(dtype).contiguous(), ang.sin().to(dtype).contiguous(), pos


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    item = torch.finfo(dtype).bits // 8
    if device.type == "cpu":
        shapes = CPU_QUICK if quick else CPU_SHAPES
    else:
        shapes = CUDA_QUICK if quick else CUDA_SHAPES
    hf, hf_name = _hf_apply()
    out = []
    for shape in shapes:
        b, hq, hk, t, d = shape

        def eager(q, k, cos, sin, pos, hf=hf):
            return hf(q, k, cos, sin)

        impls = {}
        for be in backends.available(device.type):
            if be != "torch":
                impls[f"fastlm-{be}"] = functools.partial(_tables, backend=be)
                impls[f"fastlm-{be} pos"] = functools.partial(_positions, backend=be)
        impls["torch"] = eager
        impls["torch.compile"] = torch.compile(eager, dynamic=False)
        qk = (hq + hk) * b * t * d * item
        tables = 2 * b * t * d * item
        once = 2 * qk + tables
        out.append(Case(
            op="rotary", name=f"rope {b}x{hq}/{hk}x{t}x{d}", shape=shape, dtype=dtype,
            make=functools.partial(_make, shape, dtype, device), impls=impls,
            work={"fwd": once, "bwd": once, "fwdbwd": 2 * once},
        ))
    print(f"rotary: the eager competitor is {hf_name}")
    return out


def _tables(q, k, cos, sin, pos, *, backend):
    return ops.rotary_embedding(q, k, cos, sin, backend=backend)


def _positions(q, k, cos, sin, pos, *, backend):
    return ops.rotary_embedding(q, k, position_ids=pos, backend=backend)
