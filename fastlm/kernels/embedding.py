"""Embedding lookup in Triton: the table gather, the token-plus-position input layer, its gradient.

Launchers follow the contract of csrc/fastlm.h (embedding_fwd_cpu, tok_pos_embedding_fwd_cpu,
embedding_bwd_cpu): contiguous tensors, ids int32 or int64, tables float16, bfloat16 or float32.

Forward: each program copies a tile of BLOCK_R rows x BLOCK_D columns (about TILE_BYTES of the
table); rows wider than MAX_ROW_BYTES are split over a second grid axis of column blocks, so no
program holds more than one tile. Offsets are 64-bit: V * D and n * D pass 2**31. The token +
position variant adds the position row in float32 and rounds once, in the same single pass.

Bad ids: the kernel never loads a row for an id outside [0, V); it masks that row and atomically
lowers a one-element int64 buffer (initialised to n) to the smallest offending position. The
launcher never reads that buffer on the host (a decode step must not wait for the device, and a
CUDA graph cannot): it hands it to torch._assert_async. On a CPU that check runs at once and the
launcher raises IndexError naming the id; on a GPU it fails later, as a device-side assert with
this module's message (the way torch's own gather reports a bad index), and nothing was read out
of bounds meanwhile.

Backward, fast path: float32 atomic adds into a zeroed float32 (V, D) buffer, cast afterwards.
Backward, deterministic: the launcher sorts the ids (stable) and finds where each run of equal ids
ends (searchsorted, no host sync); one program per sorted position, of which only those that start
a run do any work: each sums its run's dout rows in a fixed order and writes its row of dweight
once. Rows that no id names stay zero, as does row padding_idx. Ids outside [0, V) are skipped
by both paths (the forward has already rejected them), so nothing is ever written out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import checker
from ._spec import SPEC_DTYPES, Spec

_check = checker("embedding")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)
TILE_BYTES = 16384  # one program's tile of table rows, forward and atomic backward
MAX_ROW_BYTES = 8192  # BLOCK_D * element size at most; wider rows take several column blocks
MAX_BLOCK_R = 128
# Deterministic backward: narrower column blocks, so that a long run of one id (a frequent token)
# is summed by several programs side by side, and a few rows per step.
SORTED_BLOCK_R, SORTED_MAX_BLOCK_D = 16, 256


@triton.jit
def _embedding_fwd_kernel(
    Ids, W, Pos, Out, Bad,
    n, V, D, T, start_pos,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 64-bit rows and offsets: n * D and V * D pass 2**31 for large batches and tables.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n
    col_mask = cols < D

    ids = tl.load(Ids + rows, mask=row_mask, other=0).to(tl.int64)
    ok = (ids >= 0) & (ids < V)
    # Record the first bad position of this tile (column block 0 only: one report per row).
    first_bad = tl.min(tl.where(row_mask & ~ok, rows, n), axis=0)
    tl.atomic_min(Bad, first_bad, mask=(first_bad < n) & (tl.program_id(1) == 0), sem="relaxed")

    # Bad rows are masked and their offset clamped to row 0: nothing outside the table is read.
    src = tl.where(ok, ids, 0)[:, None] * D + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(W + src, mask=mask & ok[:, None], other=0.0)
    if HAS_POS:
        p_rows = start_pos + rows % T
        p = tl.load(Pos + p_rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32) + p.to(tl.float32)  # one rounding, at the store
    tl.store(Out + rows[:, None] * D + cols[None, :], x.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _embedding_bwd_atomic_kernel(
    DOut, Ids, DW,
    n, V, D, padding_idx,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < n
    col_mask = cols < D

    ids = tl.load(Ids + rows, mask=row_mask, other=0).to(tl.int64)
    keep = row_mask & (ids >= 0) & (ids < V) & (ids != padding_idx)
    mask = keep[:, None] & col_mask[None, :]
    g = tl.load(DOut + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dst = tl.where(keep, ids, 0)[:, None] * D + cols[None, :]
    tl.atomic_add(DW + dst, g, mask=mask, sem="relaxed")


@triton.jit
def _embedding_bwd_sorted_kernel(
    DOut, SortedIds, Perm, RunEnd, DW,
    V, D, padding_idx,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # a position in the sorted ids
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D

    v = tl.load(SortedIds + i).to(tl.int64)
    prev = tl.load(SortedIds + tl.maximum(i - 1, 0)).to(tl.int64)
    # Only the first position of a run works; the others, and skipped ids, get an empty loop.
    keep = ((i == 0) | (prev != v)) & (v >= 0) & (v < V) & (v != padding_idx)
    end = tl.where(keep, tl.load(RunEnd + i), i)

    # Stable sort: the run lists its dout rows in ascending order, and the loop and the final
    # reduction visit them in an order fixed by (run, BLOCK_R): bitwise reproducible.
    # (A while loop, not `range(i, end)`: triton 3.6's interpreter cannot take tensor loop bounds.)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    j = i
    while j < end:
        r = j + tl.arange(0, BLOCK_R)
        r_mask = r < end
        src = tl.load(Perm + r, mask=r_mask, other=0)
        acc += tl.load(
            DOut + src[:, None] * D + cols[None, :], mask=r_mask[:, None] & col_mask[None, :], other=0.0
        ).to(tl.float32)
        j += BLOCK_R
    row = tl.sum(acc, axis=0)
    # tl.where, not `keep & col_mask`: the interpreter turns a scalar-and-vector `&` into integers.
    mask = tl.where(keep, col_mask, False)
    tl.store(DW + tl.where(keep, v, 0) * D + cols, row.to(DW.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_table(name: str, t: torch.Tensor) -> tuple[int, int]:
    _check(t.dim() == 2, f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    _check(t.dtype in DTYPES, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    _check(t.is_contiguous(), f"{name} must be contiguous")
    return t.shape[0], t.shape[1]


def _check_ids(ids: torch.Tensor, dim: int, like: torch.Tensor, like_name: str) -> None:
    _check(ids.dim() == dim, f"ids must be {dim}-D, got shape {tuple(ids.shape)}")
    _check(ids.dtype in ID_DTYPES, f"ids must be int32 or int64, got {ids.dtype}")
    _check(ids.is_contiguous(), "ids must be contiguous")
    _check(ids.device == like.device, f"ids is on {ids.device} but {like_name} is on {like.device}")


def _tile(D: int, elem_size: int, n: int, on_gpu: bool, max_block_d: int | None = None,
          block_r: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of D elements of elem_size bytes."""
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_ROW_BYTES // elem_size)
    if max_block_d is not None:
        block_d = min(block_d, max_block_d)
    if block_r is None:
        block_r = max(1, min(MAX_BLOCK_R, TILE_BYTES // (block_d * elem_size)))
    if not on_gpu:
        # The interpreter runs whole tiles one program after another: no tile taller than n.
        block_r = min(block_r, triton.next_power_of_2(max(n, 1)))
    return block_r, block_d, _num_warps(block_d * elem_size)


def _num_warps(row_bytes: int) -> int:
    # Tiles are ~TILE_BYTES whatever D; wide rows get more warps so that a row's 16-byte vectors
    # spread over more threads (fewer registers each), narrow rows stack several rows per warp.
    return 4 if row_bytes <= 2048 else 8


def _check_bad_ids(bad: torch.Tensor, ids: torch.Tensor, V: int) -> None:
    n = ids.numel()
    try:
        torch._assert_async(bad[0] == n, f"fastlm.kernels.embedding: an id is out of range for an embedding "
                                         f"table of {V} rows")
    except RuntimeError:  # raised here only where the check is synchronous: a CPU tensor
        _raise_bad_id(bad, ids, V)
        raise


def _raise_bad_id(bad: torch.Tensor, ids: torch.Tensor, V: int) -> None:
    pos = int(bad.item())  # on the error path only
    if pos < ids.numel():
        value = int(ids.view(-1)[pos].item())
        where = "ids[" + ", ".join(str(k) for k in _unravel(pos, ids.shape)) + "]"
        raise IndexError(
            f"fastlm.kernels.embedding: id {value} is out of range for an embedding table of {V} rows "
            f"(first at {where})"
        )


def _unravel(pos: int, shape: torch.Size) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(pos % size)
        pos //= size
    return out[::-1]


def _launch_fwd(ids, weight, pos, out, T, start_pos):
    n = ids.numel()
    V, D = weight.shape
    if n == 0:
        return
    block_r, block_d, warps = _tile(D, weight.element_size(), n, weight.device.type == "cuda")
    bad = torch.full((1,), n, dtype=torch.int64, device=ids.device)
    # D == 0 still launches one column block: the ids are checked all the same.
    grid = (triton.cdiv(n, block_r), max(1, triton.cdiv(D, block_d)))
    _embedding_fwd_kernel[grid](
        ids, weight, pos if pos is not None else weight, out, bad,
        n, V, D, T, start_pos,
        HAS_POS=pos is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    _check_bad_ids(bad, ids, V)


def embedding_fwd(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out (n, D) = weight[ids] for ids (n,); IndexError for an id outside [0, V)."""
    _check_table("weight", weight)
    _check_ids(ids, 1, weight, "weight")
    out = weight.new_empty((ids.shape[0], weight.shape[1]))
    _launch_fwd(ids, weight, None, out, 1, 0)
    return out


def tok_pos_embedding_fwd(ids: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
    """out (B, T, D) = tok[ids] + pos[start_pos : start_pos + T], summed in float32, rounded once."""
    _, D = _check_table("tok", tok)
    P, D_pos = _check_table("pos", pos)
    _check_ids(ids, 2, tok, "tok")
    _check(pos.dtype == tok.dtype, f"pos must have dtype {tok.dtype} like tok, got {pos.dtype}")
    _check(pos.device == tok.device, f"pos is on {pos.device} but tok is on {tok.device}")
    _check(D_pos == D, f"pos must have D={D} columns like tok, got shape {tuple(pos.shape)}")
    B, T = ids.shape
    start_pos = int(start_pos)
    _check(start_pos >= 0, f"start_pos must be >= 0, got {start_pos}")
    _check(start_pos + T <= P, f"start_pos={start_pos} plus the sequence length T={T} exceeds the "
                               f"position table's {P} rows")
    out = tok.new_empty((B, T, D))
    _launch_fwd(ids, tok, pos, out, max(T, 1), start_pos)
    return out


def embedding_bwd(
    dout: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int, deterministic: bool
) -> torch.Tensor:
    """dweight (num_weights, D) in dout's dtype: the float32 sum of dout's rows by id."""
    n, D = _check_table("dout", dout)
    _check_ids(ids, 1, dout, "dout")
    _check(ids.shape[0] == n, f"ids must have shape ({n},) like dout's rows, got {tuple(ids.shape)}")
    V, padding_idx = int(num_weights), int(padding_idx)
    _check(V >= 0, f"num_weights must be >= 0, got {V}")
    _check(padding_idx == -1 or 0 <= padding_idx < V,
           f"padding_idx must be -1 (none) or in [0, {V}), got {padding_idx}")
    on_gpu = dout.device.type == "cuda"

    if deterministic:
        dw = torch.zeros((V, D), dtype=dout.dtype, device=dout.device)
        if n == 0 or D == 0 or V == 0:
            return dw
        sorted_ids, perm = torch.sort(ids, stable=True)
        run_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
        block_r, block_d, warps = _tile(D, 4, n, on_gpu, SORTED_MAX_BLOCK_D, SORTED_BLOCK_R)
        _embedding_bwd_sorted_kernel[(n, triton.cdiv(D, block_d))](
            dout, sorted_ids, perm, run_end, dw,
            V, D, padding_idx,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
        return dw

    # Atomics only on float32 (bf16 atomics are not exact, and raise under the interpreter).
    dw32 = torch.zeros((V, D), dtype=torch.float32, device=dout.device)
    if n > 0 and D > 0 and V > 0:
        block_r, block_d, warps = _tile(D, dout.element_size(), n, on_gpu)
        _embedding_bwd_atomic_kernel[(triton.cdiv(n, block_r), triton.cdiv(D, block_d))](
            dout, ids, dw32,
            n, V, D, padding_idx,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return dw32 if dout.dtype == torch.float32 else dw32.to(dout.dtype)


# ---------------------------------------------------------------------------------------------
# Compile specs: the variants tools/check_triton.py compiles for sm_90, restating the launchers' choices


def compile_specs() -> list[Spec]:
    specs = []
    size = {"fp16": 2, "bf16": 2, "fp32": 4}
    for dt in SPEC_DTYPES:
        # (D, ids types, HAS_POS values, D divisible by 16): a narrow table, the typical width in
        # every flag combination, the widest column block, and an unaligned width (no vector loads).
        fwd_cases = [(64, ("i64",), (False, True), True), (768, ("i32", "i64"), (False, True), True),
                     (8192, ("i64",), (False, True), True), (7, ("i64",), (False,), False)]
        for D, id_types, pos_flags, aligned in fwd_cases:
            block_r, block_d, warps = _tile(D, size[dt], 1 << 20, True)
            for it in id_types:
                for has_pos in pos_flags:
                    sig = {"Ids": f"*{it}", "W": f"*{dt}", "Pos": f"*{dt}", "Out": f"*{dt}", "Bad": "*i64",
                           "n": "i32", "V": "i32", "D": "i32", "start_pos": "i32"}
                    consts = {"HAS_POS": has_pos, "BLOCK_R": block_r, "BLOCK_D": block_d}
                    if has_pos:
                        sig["T"] = "i32"
                    else:
                        consts["T"] = 1  # the launcher passes T = 1, which a launch specialises
                    specs.append(Spec(
                        f"embedding_fwd[{'tok+pos' if has_pos else 'tok'},{it},D={D}]", dt,
                        _embedding_fwd_kernel, sig, consts, warps,
                        ("D", "start_pos") if aligned else ("start_pos",),
                    ))
        for D, id_types, aligned in ((64, ("i64",), True), (768, ("i32", "i64"), True), (8192, ("i64",), True),
                                     (7, ("i64",), False)):
            block_r, block_d, warps = _tile(D, size[dt], 1 << 20, True)
            for it in id_types:
                specs.append(Spec(
                    f"embedding_bwd_atomic[{it},D={D}]", dt,
                    _embedding_bwd_atomic_kernel,
                    {"DOut": f"*{dt}", "Ids": f"*{it}", "DW": "*fp32",
                     "n": "i32", "V": "i32", "D": "i32", "padding_idx": "i32"},
                    {"BLOCK_R": block_r, "BLOCK_D": block_d}, warps, ("D",) if aligned else (),
                ))
        for D, id_types, aligned in ((64, ("i64",), True), (768, ("i32", "i64"), True), (7, ("i64",), False)):
            block_r, block_d, warps = _tile(
                D, 4, 1 << 20, True, SORTED_MAX_BLOCK_D, SORTED_BLOCK_R)
            for it in id_types:
                specs.append(Spec(
                    f"embedding_bwd_sorted[{it},D={D}]", dt,
                    _embedding_bwd_sorted_kernel,
                    {"DOut": f"*{dt}", "SortedIds": f"*{it}", "Perm": "*i64", "RunEnd": "*i64", "DW": f"*{dt}",
                     "V": "i32", "D": "i32", "padding_idx": "i32"},
                    {"BLOCK_R": block_r, "BLOCK_D": block_d}, warps, ("D",) if aligned else (),
                ))
    return specs
