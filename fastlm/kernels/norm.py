"""Layer norm and RMS norm in Triton, with an optional fused residual add.

Launchers follow the contract of csrc/fastlm.h (norm_fwd_cpu / norm_bwd_cpu): 2-D contiguous
(M, N) tensors, absent optional tensors passed as None, outputs that do not apply returned empty.
Statistics and all arithmetic are float32 whatever the storage dtype.

Forward: one program per row; the whole row lives in registers, hence the N <= 65536 limit.
Backward: each program walks a contiguous band of rows, writes dx, and keeps its share of dweight
and dbias in registers; it stores one float32 partial row, and a second kernel sums the partial
rows column-wise. Two stages instead of atomics: deterministic, and bf16-safe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import checker, sm_count
from ._spec import SPEC_DTYPES, Spec

_check = checker("norm")

MAX_N = 65536
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
COL_SUM_BLOCK_ROWS, COL_SUM_BLOCK_COLS = 32, 64  # the column-sum tile on a GPU


@triton.jit
def _norm_fwd_kernel(
    X, W, B, R, Y, H, Mean, Rstd,
    N, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    # 64-bit row offset: M * N passes 2**31 for large activations.
    offs = row.to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N

    x = tl.load(X + offs + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + offs + cols, mask=mask, other=0.0).to(tl.float32)
        # Round h to the storage dtype before normalising, so that the result equals the
        # unfused `h = x + r; norm(h)` and the backward pass sees exactly what was normalised.
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + offs + cols, h, mask=mask)
        x = h.to(tl.float32)

    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=0) / N
        # Two-pass variance (centre first): no cancellation when |mean| >> std.
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = tl.rsqrt(var + eps)
    tl.store(Rstd + row, rstd)

    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DH, DX, DW_part, DB_part,
    M, N, rows_per_program,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DH: tl.constexpr, RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    offs = row_start.to(tl.int64) * N  # 64-bit: M * N passes 2**31 for large activations
    for row in range(row_start, row_end):
        x = tl.load(X + offs + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if RMS:
            xhat = x * rstd
        else:
            # Masked lanes must not contribute (-mean * rstd) to the row sums below.
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        if HAS_W:
            g = dy * w
            dw += dy * xhat
        else:
            g = dy
        if HAS_B:
            db += dy

        # dx = rstd * (g - xhat * mean(g * xhat) [- mean(g) for layer norm])
        c1 = tl.sum(xhat * g, axis=0) / N
        if RMS:
            dx = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=0) / N
            dx = (g - xhat * c1 - c2) * rstd
        if HAS_DH:
            dx += tl.load(DH + offs + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs + cols, dx.to(DX.dtype.element_ty), mask=mask)
        offs += N

    if HAS_W:
        tl.store(DW_part + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_part + pid * N + cols, db, mask=mask)


@triton.jit
def _col_sum_kernel(P, Out, num_rows, N, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < N
    # Accumulate a 2-D tile and reduce once at the end: one tree reduction, not num_rows adds.
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_ROWS):
        rows = r0 + tl.arange(0, BLOCK_ROWS)
        m = (rows < num_rows)[:, None] & col_mask[None, :]
        acc += tl.load(P + rows[:, None] * N + cols[None, :], mask=m, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_row_tensor(name: str, t: torch.Tensor | None, x: torch.Tensor, shape: tuple) -> None:
    if t is None:
        return
    _check(tuple(t.shape) == shape, f"{name} must have shape {shape}, got {tuple(t.shape)}")
    _check(t.dtype == x.dtype, f"{name} must have dtype {x.dtype} like x, got {t.dtype}")
    _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
    _check(t.is_contiguous(), f"{name} must be contiguous")


def _check_x(x: torch.Tensor) -> tuple[int, int, int]:
    _check(x.dim() == 2, f"x must be 2-D (M, N), got shape {tuple(x.shape)}")
    _check(x.dtype in DTYPES, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check(x.is_contiguous(), "x must be contiguous")
    M, N = x.shape
    _check(N >= 1, "the normalised dimension N must be at least 1")
    _check(N <= MAX_N, f"the normalised dimension N={N} exceeds the Triton kernel's limit of {MAX_N} "
                       "(a whole row must fit in one program); use another backend")
    return M, N, triton.next_power_of_2(N)


def _num_warps(block_n: int) -> int:
    # Roughly 8-16 float32 values per thread per row-sized tensor; larger rows spill regardless.
    if block_n <= 2048:
        return 4
    if block_n <= 8192:
        return 8
    return 16 if block_n <= 16384 else 32


@functools.cache
def _bwd_programs(x: torch.Tensor, M: int) -> int:
    if x.device.type == "cuda":
        # A few resident programs per SM keep enough loads in flight; more only grows the partials.
        n = 4 * sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        # The interpreter runs programs one after another: fewer programs, fewer partial rows.
        n = 4
    return max(1, min(n, M))


def _col_sum(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    num_rows, N = partials.shape
    out = torch.empty(N, dtype=dtype, device=partials.device)
    on_gpu = partials.device.type == "cuda"
    # Narrow column strips give the GPU many programs; the interpreter wants few, wide ones.
    block_cols = COL_SUM_BLOCK_COLS if on_gpu else min(triton.next_power_of_2(N), 1024)
    block_rows = COL_SUM_BLOCK_ROWS if on_gpu else min(triton.next_power_of_2(num_rows), 32)
    _col_sum_kernel[(triton.cdiv(N, block_cols),)](
        partials, out, num_rows, N, BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=4
    )
    return out


def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, h or empty, mean (M,) float32 or empty for rms, rstd (M,) float32)."""
    M, N, block_n = _check_x(x)
    _check_row_tensor("weight", weight, x, (N,))
    _check_row_tensor("bias", bias, x, (N,))
    _check_row_tensor("residual", residual, x, (M, N))
    _check(not (rms and bias is not None), "RMS norm takes no bias")

    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if rms else M, dtype=torch.float32)
    rstd = x.new_empty(M, dtype=torch.float32)
    if M == 0:
        return y, h, mean, rstd

    # Absent tensors still need a pointer argument; x stands in, and the constexpr flags keep
    # the kernel from touching it.
    _norm_fwd_kernel[(M,)](
        x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        residual if residual is not None else x,
        y,
        h if residual is not None else y,
        mean if not rms else rstd,
        rstd,
        N,
        float(eps),
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_RES=residual is not None,
        RMS=bool(rms),
        BLOCK_N=block_n,
        num_warps=_num_warps(block_n),
    )
    return y, h, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
    rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight or empty, dbias or empty); dh, when given, is added to dx."""
    M, N, block_n = _check_x(x)
    _check_row_tensor("dy", dy, x, (M, N))
    _check_row_tensor("dh", dh, x, (M, N))
    _check_row_tensor("weight", weight, x, (N,))
    for name, t, n in (("rstd", rstd, M), ("mean", mean, 0 if rms else M)):
        _check(tuple(t.shape) == (n,) and t.dtype == torch.float32 and t.device == x.device,
               f"{name} must be a float32 tensor of shape ({n},) on {x.device}, got "
               f"{t.dtype} {tuple(t.shape)} on {t.device}")

    has_w = weight is not None
    dx = torch.empty_like(x)
    if M == 0:
        dw = x.new_zeros(N) if has_w else x.new_empty(0)
        db = x.new_zeros(N) if has_bias else x.new_empty(0)
        return dx, dw, db

    programs = _bwd_programs(x, M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)  # no program left without rows
    dw_part = torch.empty((programs, N), dtype=torch.float32, device=x.device) if has_w else rstd
    db_part = torch.empty((programs, N), dtype=torch.float32, device=x.device) if has_bias else rstd

    _norm_bwd_kernel[(programs,)](
        dy,
        x,
        weight if has_w else x,
        mean if not rms else rstd,
        rstd,
        dh if dh is not None else x,
        dx,
        dw_part,
        db_part,
        M,
        N,
        rows_per_program,
        HAS_W=has_w,
        HAS_B=bool(has_bias),
        HAS_DH=dh is not None,
        RMS=bool(rms),
        BLOCK_N=block_n,
        num_warps=_num_warps(block_n),
    )
    dw = _col_sum(dw_part, weight.dtype) if has_w else x.new_empty(0)
    db = _col_sum(db_part, x.dtype) if has_bias else x.new_empty(0)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Compile specs: the variants tools/check_triton.py compiles for sm_90, restating the launchers' choices


def compile_specs() -> list[Spec]:
    specs = []
    # (HAS_W, HAS_B, RMS): every affine combination the ops layer can ask for.
    flag_sets = [(w, b, False) for w, b in ((0, 0), (1, 0), (1, 1))] + [(w, 0, True) for w in (0, 1)]
    block_ns = (1024, 8192, MAX_N)
    for dt in SPEC_DTYPES:
        for block_n in block_ns:
            warps = _num_warps(block_n)
            # The full flag matrix at a typical width; the wide rows (register pressure) with all flags.
            flags = flag_sets if block_n == 1024 else [(1, 1, False), (1, 0, True)]
            for has_w, has_b, rms in flags:
                for extra in (False, True):  # residual in the forward, dh in the backward
                    tag = f"{'rms' if rms else 'ln'}{',w' if has_w else ''}{',b' if has_b else ''}"
                    specs.append(Spec(
                        f"norm_fwd[{tag}{',res' if extra else ''},N={block_n}]", dt,
                        _norm_fwd_kernel,
                        {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "R": f"*{dt}", "Y": f"*{dt}",
                         "H": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32", "N": "i32", "eps": "fp32"},
                        {"HAS_W": bool(has_w), "HAS_B": bool(has_b), "HAS_RES": extra, "RMS": rms,
                         "BLOCK_N": block_n},
                        warps,
                    ))
                    specs.append(Spec(
                        f"norm_bwd[{tag}{',dh' if extra else ''},N={block_n}]", dt,
                        _norm_bwd_kernel,
                        {"DY": f"*{dt}", "X": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32",
                         "DH": f"*{dt}", "DX": f"*{dt}", "DW_part": "*fp32", "DB_part": "*fp32",
                         "M": "i32", "N": "i32", "rows_per_program": "i32"},
                        {"HAS_W": bool(has_w), "HAS_B": bool(has_b), "HAS_DH": extra, "RMS": rms,
                         "BLOCK_N": block_n},
                        warps,
                    ))
        specs.append(Spec(
            "norm_col_sum", dt,
            _col_sum_kernel,
            {"P": "*fp32", "Out": f"*{dt}", "num_rows": "i32", "N": "i32"},
            {"BLOCK_ROWS": COL_SUM_BLOCK_ROWS, "BLOCK_COLS": COL_SUM_BLOCK_COLS},
        ))
    return specs
