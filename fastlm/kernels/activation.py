"""Bias + GELU in Triton: y = gelu(x + bias), forward and backward.

Launchers follow the contract of csrc/fastlm.h (bias_gelu_fwd_cpu / bias_gelu_bwd_cpu): 2-D
contiguous (M, N) tensors, bias (N,) in x's dtype or None, dbias float32 or empty. All arithmetic
is float32 whatever the storage dtype.

Both passes tile (M, N) into BLOCK_M x BLOCK_N tiles: the bias tile is loaded once per program and
broadcast down its rows. The tanh GELU is written as v * sigmoid(2u), whose derivative
s + v * 2u' * s * (1 - s) needs one exponential; the exact GELU takes Phi from erf.
Backward: a program walks a column strip of row tiles (stepping by the grid's height), writes dx
and keeps its strip's share of dbias in registers; it stores one float32 partial row, and the
partial rows are summed by torch afterwards. Partial rows instead of atomics: deterministic.

SiLU times gate (silu_mul_fwd / silu_mul_bwd, csrc/fastlm.h's contract): gate, up and dy (M, N)
with a unit column stride and any row stride, outputs contiguous; the same (M, N) tiles, one pass
each way. silu(g) = g / (1 + e), e = exp(-g) unclamped (-0 below about -88, NaN at -inf, as
torch's); the backward takes 1 - s as e * s for g > 0, where 1 - s would cancel.
Tested under TRITON_INTERPRET=1 and compiled for sm_90 (tools/check_triton.py); not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import checker, sm_count
from ._spec import SPEC_DTYPES, Spec

_check = checker("activation")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Constants a kernel reads must be constexpr globals.
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
CUBIC = tl.constexpr(0.044715)
RSQRT_2 = tl.constexpr(0.7071067811865476)
RSQRT_2PI = tl.constexpr(0.3989422804014327)
TANH_CLAMP = tl.constexpr(9.5)


@triton.jit
def _gelu_and_grad(v, TANH: tl.constexpr, GRAD: tl.constexpr):
    """gelu(v) or, with GRAD, gelu'(v), in float32."""
    if TANH:
        if GRAD:
            # e * s * s would meet inf * 0 for e = inf: the derivative runs on v clamped to where
            # it is 0 or 1 to float precision (|2u(9.5)| = 76.3), plus (v - v), which is NaN for
            # +-inf and NaN, as torch's gelu' is there, and 0 otherwise.
            c = tl.where(v < -TANH_CLAMP, -TANH_CLAMP, tl.where(v > TANH_CLAMP, TANH_CLAMP, v))
            a = -2.0 * SQRT_2_OVER_PI * c * (1.0 + CUBIC * c * c)
            e = tl.exp(a)
            s = 1.0 / (1.0 + e)
            out = s + c * (2.0 * SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * c * c)) * (e * s * s) + (v - v)
        else:
            # e = exp(-2u) unclamped: it overflows to inf for v below about -10, so v / (1 + e) is
            # -0 there (a finite cap on e leaves v / e finite and wrong for huge |v|), NaN at -inf.
            a = -2.0 * SQRT_2_OVER_PI * v * (1.0 + CUBIC * v * v)
            e = tl.exp(a)
            out = v / (1.0 + e)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(v * RSQRT_2))
        if GRAD:
            out = cdf + v * tl.exp(-0.5 * v * v) * RSQRT_2PI
        else:
            out = v * cdf
    return out


@triton.jit
def _bias_gelu_fwd_kernel(
    X, B, Y, M, N,
    HAS_B: tl.constexpr, TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < M)[:, None] & col_mask[None, :]
    # 64-bit offsets: M * N passes 2**31 for large activations.
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        v += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = _gelu_and_grad(v, TANH, False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, B, DX, DB_part, M, N,
    HAS_B: tl.constexpr, NEED_DB: tl.constexpr, TANH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_B:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(pid_m * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            v += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dy * _gelu_and_grad(v, TANH, True)  # masked lanes: dy = 0, so dx = 0
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DB:
            db += dx
    if NEED_DB:
        # One reduction over the tile's rows at the end, not one per row tile.
        tl.store(DB_part + pid_m * N + cols, tl.sum(db, axis=0), mask=col_mask)


@triton.jit
def _silu_mul_fwd_kernel(G, U, Y, M, N, stride_g, stride_u, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # silu(g) before the product: g * u could overflow where silu(g) * u is -0.
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-g)
    s = 1.0 / (1.0 + e)
    dsilu = s * (1.0 + g * tl.where(g > 0.0, e * s, 1.0 - s))
    offs = rows[:, None] * N + cols[None, :]
    tl.store(DG + offs, (dy * u * dsilu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * (g * s)).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_args(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    _check(x.dim() == 2, f"x must be 2-D (M, N), got shape {tuple(x.shape)}")
    _check(x.dtype in DTYPES, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check(x.is_contiguous(), "x must be contiguous")
    M, N = x.shape
    if bias is not None:
        _check(tuple(bias.shape) == (N,), f"bias must have shape ({N},), got {tuple(bias.shape)}")
        _check(bias.dtype == x.dtype, f"bias must have dtype {x.dtype} like x, got {bias.dtype}")
        _check(bias.device == x.device, f"bias is on {bias.device} but x is on {x.device}")
        _check(bias.is_contiguous(), "bias must be contiguous")
    return M, N


def tile(M: int, N: int, on_gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps). On a GPU about 4096 elements per tile (16 per thread at 8
    warps); the interpreter runs programs one after another and wants few, large ones."""
    if on_gpu:
        block_n = min(triton.next_power_of_2(N), 1024)
        return max(1, 4096 // block_n), block_n, 8
    block_n = min(triton.next_power_of_2(N), 4096)
    return min(triton.next_power_of_2(M), max(1, 16384 // block_n)), block_n, 4


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, tanh: bool) -> torch.Tensor:
    """Returns gelu(x + bias) in x's dtype."""
    M, N = _check_args(x, bias)
    y = torch.empty_like(x)
    if M == 0 or N == 0:
        return y
    block_m, block_n, warps = tile(M, N, x.device.type == "cuda")
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    # An absent bias still needs a pointer argument; x stands in, and HAS_B keeps it unread.
    _bias_gelu_fwd_kernel[grid](
        x, bias if bias is not None else x, y, M, N,
        HAS_B=bias is not None, TANH=bool(tanh), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y


def bias_gelu_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, tanh: bool, need_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx in x's dtype, dbias float32 (N,) or empty without need_dbias)."""
    M, N = _check_args(x, bias)
    _check(dy.shape == x.shape and dy.dtype == x.dtype and dy.device == x.device and dy.is_contiguous(),
           f"dy must be contiguous with x's shape, dtype and device, got {dy.dtype} {tuple(dy.shape)} "
           f"on {dy.device}")
    dx = torch.empty_like(x)
    if M == 0 or N == 0:
        return dx, (x.new_zeros(N, dtype=torch.float32) if need_dbias else x.new_empty(0, dtype=torch.float32))
    on_gpu = x.device.type == "cuda"
    block_m, block_n, warps = tile(M, N, on_gpu)
    col_blocks = triton.cdiv(N, block_n)
    row_tiles = triton.cdiv(M, block_m)
    if on_gpu and need_dbias:
        # Enough programs for a few per SM; more would only add partial rows to sum.
        sms = sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
        row_programs = max(1, min(row_tiles, triton.cdiv(4 * sms, col_blocks)))
    else:
        row_programs = row_tiles if on_gpu else min(row_tiles, 4)
    db_part = (torch.empty((row_programs, N), dtype=torch.float32, device=x.device) if need_dbias
               else x.new_empty(0, dtype=torch.float32))
    _bias_gelu_bwd_kernel[(row_programs, col_blocks)](
        dy, x, bias if bias is not None else x, dx, db_part if need_dbias else dx, M, N,
        HAS_B=bias is not None, NEED_DB=bool(need_dbias), TANH=bool(tanh),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return dx, (db_part.sum(0) if need_dbias else db_part)


def _check_rows(name: str, t: torch.Tensor, gate: torch.Tensor) -> None:
    _check(t.dim() == 2, f"{name} must be 2-D (M, N), got shape {tuple(t.shape)}")
    _check(t.dtype in DTYPES, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    _check(t.dtype == gate.dtype and t.shape == gate.shape and t.device == gate.device,
           f"{name} ({t.dtype} {tuple(t.shape)} on {t.device}) must match gate "
           f"({gate.dtype} {tuple(gate.shape)} on {gate.device})")
    m, n = t.shape
    _check(t.numel() == 0 or ((n <= 1 or t.stride(1) == 1) and (m <= 1 or t.stride(0) >= n)),
           f"{name} must have unit column stride and rows that do not overlap, got strides {t.stride()}")


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Returns silu(gate) * up, contiguous, in gate's dtype."""
    for name, t in (("gate", gate), ("up", up)):
        _check_rows(name, t, gate)
    M, N = gate.shape
    y = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    if y.numel() == 0:
        return y
    block_m, block_n, warps = tile(M, N, gate.device.type == "cuda")
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _silu_mul_fwd_kernel[grid](gate, up, y, M, N, _row_stride(gate), _row_stride(up),
                               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y


def silu_mul_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dgate, dup), contiguous, in gate's dtype."""
    for name, t in (("gate", gate), ("up", up), ("dy", dy)):
        _check_rows(name, t, gate)
    M, N = gate.shape
    dg = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    if dg.numel() == 0:
        return dg, du
    block_m, block_n, warps = tile(M, N, gate.device.type == "cuda")
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _silu_mul_bwd_kernel[grid](dy, gate, up, dg, du, M, N, _row_stride(dy), _row_stride(gate), _row_stride(up),
                               BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dg, du


# ---------------------------------------------------------------------------------------------
# Compile specs: the variants tools/check_triton.py compiles for sm_90, restating the launchers' choices


def compile_specs() -> list[Spec]:
    specs = []
    for dt in SPEC_DTYPES:
        # A typical MLP width (full tiles, N divisible by 16) and a ragged one (masked columns).
        for N, aligned in ((3072, True), (1000, False)):
            block_m, block_n, warps = tile(8192, N, True)
            div = ("N",) if aligned else ()
            for tanh in (True, False):
                for has_b in (True, False):
                    tag = f"{'tanh' if tanh else 'erf'}{',b' if has_b else ''},N={N}"
                    specs.append(Spec(
                        f"bias_gelu_fwd[{tag}]", dt, _bias_gelu_fwd_kernel,
                        {"X": f"*{dt}", "B": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32"},
                        {"HAS_B": has_b, "TANH": tanh, "BLOCK_M": block_m, "BLOCK_N": block_n}, warps, div,
                    ))
                    for need_db in ((True, False) if has_b else (False,)):
                        specs.append(Spec(
                            f"bias_gelu_bwd[{tag}{',db' if need_db else ''}]", dt, _bias_gelu_bwd_kernel,
                            {"DY": f"*{dt}", "X": f"*{dt}", "B": f"*{dt}", "DX": f"*{dt}", "DB_part": "*fp32",
                             "M": "i32", "N": "i32"},
                            {"HAS_B": has_b, "NEED_DB": need_db, "TANH": tanh, "BLOCK_M": block_m,
                             "BLOCK_N": block_n}, warps, div,
                        ))
    return specs + _silu_mul_specs()


def _silu_mul_specs() -> list[Spec]:
    specs = []
    for dt in SPEC_DTYPES:
        # A Llama MLP's width, read as halves of a fused (M, 2N) projection (row stride 2N, aligned),
        # and a ragged one (masked columns, unaligned rows).
        for N, aligned in ((11008, True), (1000, False)):
            block_m, block_n, warps = tile(8192, N, True)
            div = ("N", "stride_g", "stride_u") if aligned else ()
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n}
            specs.append(Spec(
                f"silu_mul_fwd[N={N}]", dt, _silu_mul_fwd_kernel,
                {"G": f"*{dt}", "U": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32", "stride_g": "i32",
                 "stride_u": "i32"}, consts, warps, div,
            ))
            specs.append(Spec(
                f"silu_mul_bwd[N={N}]", dt, _silu_mul_bwd_kernel,
                {"DY": f"*{dt}", "G": f"*{dt}", "U": f"*{dt}", "DG": f"*{dt}", "DU": f"*{dt}", "M": "i32",
                 "N": "i32", "stride_dy": "i32", "stride_g": "i32", "stride_u": "i32"},
                consts, warps, (*div, "stride_dy") if aligned else (),
            ))
    return specs
