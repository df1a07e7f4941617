"""Rotary position embedding in Triton: q and k rotated by cos/sin tables or by angles made from
positions, forward and (with `backward`) its transpose, the gradient.

Launchers follow the contract of csrc/fastlm.h (rotary_fwd_cpu / rotary_pos_fwd_cpu): q (B, Hq, T, D)
and k (B, Hk, T, D) with a unit stride on the last dim and any others, tables (Bc, T, R) float32,
positions (Bp, T) int64; outputs contiguous in q's dtype. Arithmetic is float32.

A program owns one batch row and a block of positions, and walks every head: the cos/sin of its
positions are loaded (or, for positions, computed in float64 from a host table of theta^(-2i/R))
once and reused by all heads, so computing the angles costs nothing per head (float64 angles,
reduced to [-pi, pi] before a float32 sine and cosine). Each channel i is
computed from itself and its partner p(i) (i +- R/2 in the rotate-half layout, i ^ 1 interleaved),
the second load hitting the cache lines of the first:

    forward   y_i = x_i c_i + sign_i x_p s_i        sign = -1 for the first of a pair, +1 for the second
    backward  y_i = x_i c_i - sign_i x_p s_p

Channels R.. pass through (c = 1, s = 0). Tested under TRITON_INTERPRET=1 and compiled for sm_90
(tools/check_triton.py); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import checker
from ._spec import SPEC_DTYPES, Spec

_check = checker("rotary")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TWO_PI = tl.constexpr(6.283185307179586)
INV_TWO_PI = tl.constexpr(0.15915494309189535)


@triton.jit
def _rotary_kernel(
    X, Y, COS, SIN, POS, INV_FREQ,
    H, T, D, R, sxb, sxh, sxt, sab,
    TABLE: tl.constexpr, INTERLEAVED: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_D)
    half = R // 2
    rot = i < R
    if INTERLEAVED:
        partner = i ^ 1
        first = (i % 2) == 0
        pair = i // 2
    else:
        partner = tl.where(i < half, i + half, i - half)
        first = i < half
        pair = tl.where(i < half, i, i - half)
    partner = tl.where(rot, partner, i)
    sign = tl.where(first, -1.0, 1.0)
    t_ok = t < T
    rmask = t_ok[:, None] & rot[None, :]
    if TABLE:
        row = b.to(tl.int64) * sab + t.to(tl.int64)[:, None] * R
        c = tl.load(COS + row + i[None, :], mask=rmask, other=1.0)
        s = tl.load(SIN + row + i[None, :], mask=rmask, other=0.0)
        s_p = tl.load(SIN + row + partner[None, :], mask=rmask, other=0.0)
    else:
        pos = tl.load(POS + b.to(tl.int64) * sab + t, mask=t_ok, other=0).to(tl.float64)
        inv = tl.load(INV_FREQ + pair, mask=rot, other=0.0)
        # The angle and its reduction to [-pi, pi] in float64, the sine and cosine in float32:
        # float64 trigonometry would spill registers, and after the reduction float32 loses nothing
        # that a float32 table would keep.
        angle = pos[:, None] * inv[None, :]
        turns = tl.floor(angle * INV_TWO_PI + 0.5)
        red = (angle - turns * TWO_PI).to(tl.float32)
        c = tl.where(rmask, tl.cos(red), 1.0)
        s = tl.where(rmask, tl.sin(red), 0.0)
        s_p = s  # both channels of a pair share its angle
    if BACKWARD:
        sp = -sign[None, :] * s_p
    else:
        sp = sign[None, :] * s
    mask = t_ok[:, None] & (i < D)[None, :]
    src = b.to(tl.int64) * sxb + t.to(tl.int64)[:, None] * sxt
    dst = (b.to(tl.int64) * H * T + t.to(tl.int64)[:, None]) * D
    for h in range(0, H):
        xs = X + src + h * sxh
        x = tl.load(xs + i[None, :], mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(xs + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        y = x * c + xp * sp
        tl.store(Y + dst + h * T * D + i[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        _check(t.dim() == 4, f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        _check(t.shape[3] <= 1 or t.stride(3) == 1, f"{name} must have a unit stride on its last dim")
    _check(q.dtype in DTYPES, f"q must be float16, bfloat16 or float32, got {q.dtype}")
    _check(k.dtype == q.dtype and k.device == q.device,
           f"k must have q's dtype and device, got {k.dtype} on {k.device}")
    _check((k.shape[0], k.shape[2], k.shape[3]) == (q.shape[0], q.shape[2], q.shape[3]),
           f"k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, time and head_dim")


def block_t(T: int, D: int, on_gpu: bool) -> int:
    """Positions per program: on a GPU a tile of about 2048 elements per head (16 per thread at 4
    warps); the interpreter runs programs one after another and wants few, large ones."""
    per = 2048 if on_gpu else 16384
    return max(1, min(triton.next_power_of_2(max(T, 1)), per // triton.next_power_of_2(D)))


def _launch(q, k, table: bool, ptrs: tuple, R: int, sab: int, interleaved: bool, backward: bool):
    """ptrs: (COS, SIN, POS, INV_FREQ); sab: the angles' batch stride (0 for a batch-1 table)."""
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    B, _, T, D = q.shape
    if B == 0 or T == 0 or D == 0:
        return qo, ko
    bt = block_t(T, D, q.is_cuda)
    for x, y in ((q, qo), (k, ko)):
        if x.shape[1] == 0:
            continue
        _rotary_kernel[(B, triton.cdiv(T, bt))](
            x, y, *ptrs, x.shape[1], T, D, R, x.stride(0), x.stride(1), x.stride(2), sab,
            TABLE=table, INTERLEAVED=bool(interleaved), BACKWARD=bool(backward),
            BLOCK_T=bt, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return qo, ko


def rotary_fwd(q, k, cos, sin, interleaved: bool, backward: bool):
    """(q', k') rotated by the (Bc, T, R) float32 tables."""
    _check_qk(q, k)
    B, _, T, D = q.shape
    for name, t in (("cos", cos), ("sin", sin)):
        _check(t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] == T and t.shape == cos.shape,
               f"{name} must have shape (1 or {B}, {T}, R) like cos, got {tuple(t.shape)}")
        _check(t.dtype == torch.float32 and t.device == q.device and t.is_contiguous(),
               f"{name} must be a contiguous float32 tensor on q's device")
    R = cos.shape[2]
    _check(R % 2 == 0 and R <= D, f"rotary_dim {R} must be even and at most head_dim {D}")
    # Unused pointers (positions, inverse frequencies) point at the table.
    sab = T * R if cos.shape[0] > 1 else 0
    return _launch(q, k, True, (cos, sin, cos, cos), R, sab, interleaved, backward)


def rotary_pos_fwd(q, k, positions, theta: float, rotary_dim: int, interleaved: bool, backward: bool):
    """(q', k') rotated by angles positions[b, t] * theta^(-2i / rotary_dim)."""
    _check_qk(q, k)
    B, _, T, D = q.shape
    _check(positions.dim() == 2 and positions.shape[0] in (1, B) and positions.shape[1] == T,
           f"positions must have shape (1 or {B}, {T}), got {tuple(positions.shape)}")
    _check(positions.dtype == torch.int64 and positions.device == q.device and positions.is_contiguous(),
           "positions must be a contiguous int64 tensor on q's device")
    _check(theta > 0, f"theta must be positive, got {theta}")
    _check(rotary_dim >= 0 and rotary_dim % 2 == 0 and rotary_dim <= D,
           f"rotary_dim {rotary_dim} must be even, non-negative and at most head_dim {D}")
    i = torch.arange(rotary_dim // 2, dtype=torch.float64, device=q.device)
    inv_freq = float(theta) ** (-2 * i / max(rotary_dim, 1))
    if inv_freq.numel() == 0:
        inv_freq = torch.zeros(1, dtype=torch.float64, device=q.device)
    dummy = q.new_empty(1, dtype=torch.float32)
    sab = T if positions.shape[0] > 1 else 0
    return _launch(q, k, False, (dummy, dummy, positions, inv_freq), rotary_dim, sab, interleaved, backward)


# ---------------------------------------------------------------------------------------------
# Compile specs: the variants tools/check_triton.py compiles for sm_90, restating the launchers' choices


def compile_specs() -> list[Spec]:
    specs = []
    D = 128
    bt = block_t(512, D, True)
    for dt in SPEC_DTYPES:
        sig = {"X": f"*{dt}", "Y": f"*{dt}", "COS": "*fp32", "SIN": "*fp32", "POS": "*i64", "INV_FREQ": "*fp64",
               "H": "i32", "T": "i32", "D": "i32", "R": "i32", "sxb": "i64", "sxh": "i64", "sxt": "i64",
               "sab": "i64"}
        for table in (True, False):
            for interleaved in (False, True):
                for backward in (False, True):
                    specs.append(Spec(
                        name=f"rotary {'table' if table else 'positions'} {'interleaved' if interleaved else 'half'}"
                             f"{' bwd' if backward else ''}",
                        dtype=dt, fn=_rotary_kernel, signature=dict(sig),
                        constexprs=dict(TABLE=table, INTERLEAVED=interleaved, BACKWARD=backward,
                                        BLOCK_T=bt, BLOCK_D=D),
                        num_warps=4, divisible=("D", "R", "sxb", "sxh", "sxt")))
    return specs
