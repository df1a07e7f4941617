"""Attention in Triton: flash-attention forward and backward, and flash-decoding against a KV cache.

Launchers follow the contract of csrc/fastlm.h (attention_fwd_cpu, attention_bwd_cpu,
decode_attention_cpu): q (B, Hq, Tq, D), k and v (B, Hk, Tk, D) contiguous, Hq a multiple of Hk
(query head h reads key/value head h // (Hq // Hk)); mask None or a float32 additive bias viewed as
(B, Hq, Tq, Tk) with any strides (0 for a broadcast dim); is_causal keeps key j for query i when
j <= i. A query row whose keys are all masked gives zeros, lse = -inf and zero gradients.

Forward: one program per (BLOCK_M query rows, batch, head); online softmax in base 2 (log2(e) is
folded into the scale, so each score costs one exp2). Key blocks that need no masking (below the
causal diagonal, inside Tk) run in a loop without any `where`; only the diagonal and the ragged tail
run the masked loop. The bias is loaded only when a mask is given (a constexpr flag).

Backward (FlashAttention-2): a small kernel forms delta = rowsum(dout * out); the dk/dv kernel
keeps one block of keys in registers and walks the query blocks of every query head of its GQA
group, so the group's sum is formed in float32 registers and written once (no atomics, any dtype);
the dq kernel walks the key blocks of one block of queries. Both recompute the probabilities from
the forward's lse.

Decode (flash-decoding): the cache of each sequence is cut into chunks handled by separate
programs, each of which takes all query rows of one GQA group (every head of the group, every new
token) so that the chunk of K/V is read once per group. Each writes a float32 partial output and
its log-sum-exp; a second kernel combines the chunks. With a single chunk the first kernel writes
the output directly. The number of chunks depends on the cache capacity Tmax and the machine,
never on the values of cache_seqlens, so no host synchronisation is needed to launch.

Precision: scores, softmax statistics and accumulators are float32. float16/bfloat16 operands go
to the tensor cores as they are. float32 operands use input_precision="ieee" (no TF32), so the
result matches torch's float32 math path; this runs on the CUDA cores and is several times slower
than the 16-bit kernels.

Interpreter notes: bfloat16 tl.dot is wrong under TRITON_INTERPRET=1, so under the interpreter
bfloat16 tiles are upcast to float32 before every dot (UPCAST). Triton 3.6's interpreter cannot
take tensor bounds in `range`; there the loops are written as `while` loops (WHILE_LOOPS). On a GPU
they stay `for` loops, which the compiler software-pipelines (num_stages).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import checker, sm_count
from ._spec import SPEC_DTYPES, Spec

_check = checker("attention")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D = 256
DELTA_BLOCK_ROWS = 32  # rows of dout * out summed per program
MAX_SPLITS = 64  # decode chunks per sequence; the combine kernel holds them all in registers

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))


# ---------------------------------------------------------------------------------------------
# Shared helpers


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # Masks only where a bound can be crossed: an unmasked load of a full tile vectorises best.
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _as_dot_operand(x, UPCAST: tl.constexpr):
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _softmax_step(
    acc, l_i, m_i, q, K, V, mask_rows, row_ok, row_limit, offs_n, offs_d, n_keys, D, qk_scale, stride_mn,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """One key block of the online softmax. K and V point at the (b, kv head) slice.

    With BOUNDARY, keys at or past n_keys and (CAUSAL) keys past row_limit of their row are
    masked; without it the block is known to be entirely visible.
    """
    k = _as_dot_operand(_load_tile(K + offs_n[:, None] * D + offs_d[None, :], offs_n, n_keys, offs_d, D,
                                   BOUNDARY, PAD_D), UPCAST)
    v = _as_dot_operand(_load_tile(V + offs_n[:, None] * D + offs_d[None, :], offs_n, n_keys, offs_d, D,
                                   BOUNDARY, PAD_D), UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if HAS_MASK:
        if BOUNDARY:
            bias = tl.load(mask_rows + offs_n[None, :] * stride_mn,
                           mask=row_ok[:, None] & (offs_n < n_keys)[None, :], other=0.0)
        else:
            bias = tl.load(mask_rows + offs_n[None, :] * stride_mn, mask=row_ok[:, None], other=0.0)
        s += bias * _LOG2E
    if BOUNDARY:
        ok = (offs_n < n_keys)[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= row_limit[:, None])
        s = tl.where(ok, s, _NEG_INF)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps
    # exp2(-inf - -inf) = NaN out of p and alpha (both come out 0).
    m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _softmax_loop(
    acc, l_i, m_i, q, K, V, mask_rows, row_ok, row_limit, offs_n0, offs_d, lo, hi, n_keys, D, qk_scale,
    stride_mn,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if WHILE_LOOPS:
        start_n = lo
        while start_n < hi:
            acc, l_i, m_i = _softmax_step(
                acc, l_i, m_i, q, K, V, mask_rows, row_ok, row_limit, start_n + offs_n0, offs_d, n_keys, D,
                qk_scale, stride_mn, CAUSAL, HAS_MASK, BOUNDARY, PAD_D, UPCAST, PREC)
            start_n += BLOCK_N
    else:
        for start_n in tl.range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _softmax_step(
                acc, l_i, m_i, q, K, V, mask_rows, row_ok, row_limit, start_n + offs_n0, offs_d, n_keys, D,
                qk_scale, stride_mn, CAUSAL, HAS_MASK, BOUNDARY, PAD_D, UPCAST, PREC)
    return acc, l_i, m_i


@triton.jit
def _key_range(start_m, Tk, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_hi, hi) for the query block at start_m: key blocks below full_hi need no masking."""
    if IS_CAUSAL:
        hi = tl.minimum(Tk, start_m + BLOCK_M)
        # A block is visible to every row of the query block when its last key <= start_m.
        full_hi = (tl.minimum(Tk, start_m + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = Tk
        full_hi = (Tk // BLOCK_N) * BLOCK_N
    return full_hi, hi


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    Hq, Tq, Tk, D, G, num_m_blocks,
    stride_mb, stride_mh, stride_mm, stride_mn,
    qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One flat grid axis (no 65535 limit on B * Hq); query blocks of one head are adjacent so
    # that they share K/V in L2. Causal: the longest rows (last query blocks) start first.
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if IS_CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // G) + h // G

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    # 64-bit bases: B * H * T * D passes 2**31 for long sequences.
    q_off = bh.to(tl.int64) * Tq * D
    K += bhk.to(tl.int64) * Tk * D
    V += bhk.to(tl.int64) * Tk * D
    q = _as_dot_operand(_load_tile(Q + q_off + offs_m[:, None] * D + offs_d[None, :], offs_m, Tq, offs_d, D,
                                   True, PAD_D), UPCAST)
    mask_rows = Mask
    if HAS_MASK:
        mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                     + offs_m.to(tl.int64)[:, None] * stride_mm)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_INF, dtype=tl.float32)
    full_hi, hi = _key_range(start_m, Tk, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _softmax_loop(
        acc, l_i, m_i, q, K, V, mask_rows, row_ok, offs_m, offs_n0, offs_d, 0, full_hi, Tk, D, qk_scale,
        stride_mn, IS_CAUSAL, HAS_MASK, False, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_N)
    acc, l_i, m_i = _softmax_loop(
        acc, l_i, m_i, q, K, V, mask_rows, row_ok, offs_m, offs_n0, offs_d, full_hi, hi, Tk, D, qk_scale,
        stride_mn, IS_CAUSAL, HAS_MASK, True, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_N)

    empty = l_i == 0.0  # every key masked: out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, _NEG_INF, (m_i + tl.log2(l_safe)) * _LN2)
    out_mask = row_ok[:, None]
    if PAD_D:
        out_mask = out_mask & (offs_d < D)[None, :]
    tl.store(Out + q_off + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=out_mask)
    tl.store(Lse + bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_delta_kernel(
    Out, DOut, Delta, n_rows, D,
    PAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = rows[:, None] * D + offs_d[None, :]
    o = _load_tile(Out + ptrs, rows, n_rows, offs_d, D, True, PAD_D).to(tl.float32)
    do = _load_tile(DOut + ptrs, rows, n_rows, offs_d, D, True, PAD_D).to(tl.float32)
    tl.store(Delta + rows, tl.sum(o * do, 1), mask=rows < n_rows)


@triton.jit
def _load_row_stats(Lse, Delta, offs_m, Tq):
    """lse in base 2, with +inf for fully masked rows and rows past Tq (so p = exp2(s - lse) = 0)."""
    row_ok = offs_m < Tq
    lse = tl.load(Lse + offs_m, mask=row_ok, other=_NEG_INF)
    lse2 = tl.where(lse == _NEG_INF, _POS_INF, lse * _LOG2E)
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_step(
    dk, dv, k, v, Q, DO, Lse, Delta, mask_cols, key_ok, offs_m, offs_n, offs_d, Tq, D, qk_scale, stride_mm,
    HAS_MASK: tl.constexpr, CAUSAL_BLOCK: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One query block against the program's key block, in transposed form (keys on rows)."""
    q = _as_dot_operand(_load_tile(Q + offs_m[:, None] * D + offs_d[None, :], offs_m, Tq, offs_d, D,
                                   True, PAD_D), UPCAST)
    do = _as_dot_operand(_load_tile(DO + offs_m[:, None] * D + offs_d[None, :], offs_m, Tq, offs_d, D,
                                    True, PAD_D), UPCAST)
    lse2, delta = _load_row_stats(Lse, Delta, offs_m, Tq)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    if HAS_MASK:
        bias = tl.load(mask_cols + offs_m.to(tl.int64)[None, :] * stride_mm,
                       mask=key_ok[:, None] & (offs_m < Tq)[None, :], other=0.0)
        s_t += bias * _LOG2E
    p_t = tl.exp2(s_t - lse2[None, :])
    if CAUSAL_BLOCK:
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_loop(
    dk, dv, k, v, Q, DO, Lse, Delta, mask_cols, key_ok, offs_m0, offs_n, offs_d, lo, hi, Tq, D, qk_scale,
    stride_mm,
    HAS_MASK: tl.constexpr, CAUSAL_BLOCK: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    if WHILE_LOOPS:
        start_m = lo
        while start_m < hi:
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, Lse, Delta, mask_cols, key_ok, start_m + offs_m0, offs_n,
                                offs_d, Tq, D, qk_scale, stride_mm, HAS_MASK, CAUSAL_BLOCK, PAD_D, UPCAST, PREC)
            start_m += BLOCK_M
    else:
        for start_m in tl.range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, Lse, Delta, mask_cols, key_ok, start_m + offs_m0, offs_n,
                                offs_d, Tq, D, qk_scale, stride_mm, HAS_MASK, CAUSAL_BLOCK, PAD_D, UPCAST, PREC)
    return dk, dv


@triton.jit
def _dkdv_head(
    dk, dv, k, v, Q, DO, Lse, Delta, Mask, b, h, key_ok, offs_m0, offs_n, offs_d, lo, mid, Hq, Tq, D,
    qk_scale, stride_mb, stride_mh, stride_mm, stride_mn,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Adds query head h's contribution to the key block's dk, dv."""
    bh = (b * Hq + h).to(tl.int64)
    Q += bh * Tq * D
    DO += bh * Tq * D
    Lse += bh * Tq
    Delta += bh * Tq
    mask_cols = Mask
    if HAS_MASK:
        mask_cols = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                     + offs_n.to(tl.int64)[:, None] * stride_mn)
    if IS_CAUSAL:
        dk, dv = _dkdv_loop(dk, dv, k, v, Q, DO, Lse, Delta, mask_cols, key_ok, offs_m0, offs_n, offs_d, lo, mid,
                            Tq, D, qk_scale, stride_mm, HAS_MASK, True, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_M)
    dk, dv = _dkdv_loop(dk, dv, k, v, Q, DO, Lse, Delta, mask_cols, key_ok, offs_m0, offs_n, offs_d, mid, Tq,
                        Tq, D, qk_scale, stride_mm, HAS_MASK, False, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_M)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV,
    Hq, Tq, Tk, D, G, num_n_blocks,
    stride_mb, stride_mh, stride_mm, stride_mn,
    qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bhk = pid // num_n_blocks
    start_n = (pid % num_n_blocks) * BLOCK_N
    Hk = Hq // G
    b = bhk // Hk
    hk = bhk % Hk

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < Tk
    kv_off = bhk.to(tl.int64) * Tk * D
    kv_ptrs = kv_off + offs_n[:, None] * D + offs_d[None, :]
    k = _as_dot_operand(_load_tile(K + kv_ptrs, offs_n, Tk, offs_d, D, True, PAD_D), UPCAST)
    v = _as_dot_operand(_load_tile(V + kv_ptrs, offs_n, Tk, offs_d, D, True, PAD_D), UPCAST)

    if IS_CAUSAL:
        # Query blocks before lo see none of these keys; those from mid on see all of them.
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M), tl.cdiv(Tq, BLOCK_M)) * BLOCK_M
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The query heads of the GQA group, summed here in float32 (no atomics).
    h0 = hk * G
    if WHILE_LOOPS:
        h = h0
        while h < h0 + G:
            dk, dv = _dkdv_head(dk, dv, k, v, Q, DO, Lse, Delta, Mask, b, h, key_ok, offs_m0, offs_n, offs_d, lo,
                                mid, Hq, Tq, D, qk_scale, stride_mb, stride_mh, stride_mm, stride_mn,
                                HAS_MASK, IS_CAUSAL, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_M)
            h += 1
    else:
        for g in range(0, G):
            dk, dv = _dkdv_head(dk, dv, k, v, Q, DO, Lse, Delta, Mask, b, h0 + g, key_ok, offs_m0, offs_n, offs_d, lo,
                                mid, Hq, Tq, D, qk_scale, stride_mb, stride_mh, stride_mm, stride_mn,
                                HAS_MASK, IS_CAUSAL, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_M)

    out_mask = key_ok[:, None]
    if PAD_D:
        out_mask = out_mask & (offs_d < D)[None, :]
    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, K, V, mask_rows, row_ok, offs_m, offs_n, offs_d, Tk, D, qk_scale, stride_mn,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    k = _as_dot_operand(_load_tile(K + offs_n[:, None] * D + offs_d[None, :], offs_n, Tk, offs_d, D,
                                   BOUNDARY, PAD_D), UPCAST)
    v = _as_dot_operand(_load_tile(V + offs_n[:, None] * D + offs_d[None, :], offs_n, Tk, offs_d, D,
                                   BOUNDARY, PAD_D), UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if HAS_MASK:
        if BOUNDARY:
            bias = tl.load(mask_rows + offs_n[None, :] * stride_mn,
                           mask=row_ok[:, None] & (offs_n < Tk)[None, :], other=0.0)
        else:
            bias = tl.load(mask_rows + offs_n[None, :] * stride_mn, mask=row_ok[:, None], other=0.0)
        s += bias * _LOG2E
    p = tl.exp2(s - lse2[:, None])
    if BOUNDARY:
        # Keys past Tk load as zeros and would still give p = exp2(-lse) > 0.
        ok = (offs_n < Tk)[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _dq_loop(
    dq, q, do, lse2, delta, K, V, mask_rows, row_ok, offs_m, offs_n0, offs_d, lo, hi, Tk, D, qk_scale, stride_mn,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BOUNDARY: tl.constexpr, PAD_D: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if WHILE_LOOPS:
        start_n = lo
        while start_n < hi:
            dq = _dq_step(dq, q, do, lse2, delta, K, V, mask_rows, row_ok, offs_m, start_n + offs_n0, offs_d, Tk, D,
                          qk_scale, stride_mn, IS_CAUSAL, HAS_MASK, BOUNDARY, PAD_D, UPCAST, PREC)
            start_n += BLOCK_N
    else:
        for start_n in tl.range(lo, hi, BLOCK_N):
            dq = _dq_step(dq, q, do, lse2, delta, K, V, mask_rows, row_ok, offs_m, start_n + offs_n0, offs_d, Tk, D,
                          qk_scale, stride_mn, IS_CAUSAL, HAS_MASK, BOUNDARY, PAD_D, UPCAST, PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ,
    Hq, Tq, Tk, D, G, num_m_blocks,
    stride_mb, stride_mh, stride_mm, stride_mn,
    qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
    PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    if IS_CAUSAL:
        pid_m = num_m_blocks - 1 - pid_m
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // G) + h // G

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    q_off = bh.to(tl.int64) * Tq * D
    q_ptrs = q_off + offs_m[:, None] * D + offs_d[None, :]
    K += bhk.to(tl.int64) * Tk * D
    V += bhk.to(tl.int64) * Tk * D
    q = _as_dot_operand(_load_tile(Q + q_ptrs, offs_m, Tq, offs_d, D, True, PAD_D), UPCAST)
    do = _as_dot_operand(_load_tile(DO + q_ptrs, offs_m, Tq, offs_d, D, True, PAD_D), UPCAST)
    lse2, delta = _load_row_stats(Lse + bh.to(tl.int64) * Tq, Delta + bh.to(tl.int64) * Tq, offs_m, Tq)
    mask_rows = Mask
    if HAS_MASK:
        mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                     + offs_m.to(tl.int64)[:, None] * stride_mm)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_hi, hi = _key_range(start_m, Tk, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse2, delta, K, V, mask_rows, row_ok, offs_m, offs_n0, offs_d, 0, full_hi, Tk, D,
                  qk_scale, stride_mn, IS_CAUSAL, HAS_MASK, False, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_N)
    dq = _dq_loop(dq, q, do, lse2, delta, K, V, mask_rows, row_ok, offs_m, offs_n0, offs_d, full_hi, hi, Tk, D,
                  qk_scale, stride_mn, IS_CAUSAL, HAS_MASK, True, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_N)

    out_mask = row_ok[:, None]
    if PAD_D:
        out_mask = out_mask & (offs_d < D)[None, :]
    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Decode


@triton.jit
def _decode_split_kernel(
    Q, K, V, Seqlens, Out, Lse,
    Hq, Tn, Tmax, D, G, chunk, num_splits, num_row_blocks,
    qk_scale,
    PAD_D: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    WRITE_FINAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One chunk of one sequence's cache against a block of its GQA group's query rows.

    The group's rows r = g * Tn + t (head hk * G + g, new token t) are contiguous in q, so they
    form one (G * Tn, D) matrix. Writes the chunk's normalised output and base-2 lse to
    Out (rows, num_splits, D) float32 and Lse (rows, num_splits), or, with WRITE_FINAL (one
    chunk), the output itself in q's dtype.
    """
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    row_block = rest % num_row_blocks
    bhk = rest // num_row_blocks
    Hk = Hq // G
    b = bhk // Hk
    hk = bhk % Hk

    # Clamped so that a bad length can never address memory outside the cache.
    L = tl.minimum(tl.maximum(tl.load(Seqlens + b).to(tl.int32), Tn), Tmax)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = G * Tn
    row_ok = rows < n_rows
    pos = L - Tn + rows % Tn  # the position of each row's token: it sees keys 0..pos
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    row0 = (b * Hq + hk * G).to(tl.int64) * Tn  # the group's first row in q
    q = _as_dot_operand(_load_tile(Q + (row0 + rows)[:, None] * D + offs_d[None, :], rows, n_rows, offs_d, D,
                                   True, PAD_D), UPCAST)
    K += bhk.to(tl.int64) * Tmax * D
    V += bhk.to(tl.int64) * Tmax * D

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_INF, dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    # Every block is a boundary block: the causal edge of the new tokens sits at the end of the
    # last chunk, and a memory-bound loop does not notice the extra `where`.
    acc, l_i, m_i = _softmax_loop(
        acc, l_i, m_i, q, K, V, Q, row_ok, pos, offs_n0, offs_d, lo, hi, L, D, qk_scale, 0,
        True, False, True, PAD_D, UPCAST, PREC, WHILE_LOOPS, BLOCK_N)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_mask = row_ok[:, None]
    if PAD_D:
        out_mask = out_mask & (offs_d < D)[None, :]
    if WRITE_FINAL:
        tl.store(Out + (row0 + rows)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        part = (row0 + rows) * num_splits + split
        tl.store(Out + part[:, None] * D + offs_d[None, :], out, mask=out_mask)
        tl.store(Lse + part, tl.where(empty, _NEG_INF, m_i + tl.log2(l_safe)), mask=row_ok)


@triton.jit
def _decode_combine_kernel(
    Part, Lse, Out, num_splits, D,
    PAD_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(Lse + row * num_splits + offs_s, mask=offs_s < num_splits, other=_NEG_INF)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == _NEG_INF, 0.0, m))  # chunks without keys weigh 0
    # Chunks without keys wrote zeros, so w * part is 0 for them, never 0 * garbage.
    part = _load_tile(Part + (row * num_splits + offs_s)[:, None] * D + offs_d[None, :], offs_s, num_splits,
                      offs_d, D, True, PAD_D)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total == 0.0, 1.0, total)
    if PAD_D:
        tl.store(Out + row * D + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < D)
    else:
        tl.store(Out + row * D + offs_d, out.to(Out.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Configuration


def _interpreting(kernel) -> bool:
    # Under TRITON_INTERPRET=1, @triton.jit returns an interpreter object instead of a JITFunction.
    return not isinstance(kernel, triton.runtime.JITFunction)


_INTERPRET = _interpreting(_attn_fwd_kernel)
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
# Only the older interpreters need `while` loops; newer ones run the same `for` loops as a GPU.
WHILE_LOOPS = _INTERPRET and _TRITON_VERSION < (3, 9)


@functools.cache
def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def fwd_config(block_d: int, dtype: torch.dtype, on_gpu: bool, has_mask: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel.

    Chosen so that the sm_90 builds keep their tiles in registers (cuobjdump -res-usage of the
    tools/check_triton.py variants at these num_stages shows no spills); a bias tile is one more
    BLOCK_M x BLOCK_N of float32 per step, hence more warps or narrower key blocks with a mask.
    Not yet tuned by measurement on a GPU.
    """
    if not on_gpu:
        # The interpreter runs programs one after another; small tiles keep the padding cheap
        # and still take several blocks (and the masked and unmasked loops) at test sizes.
        return 32, 16, 4, 1
    if dtype == torch.float32:  # ieee dots on the CUDA cores: small tiles, or the operands spill
        return (32, 32, 4, 2) if block_d <= 64 else (32, 16, 4, 2) if block_d <= 128 else (16, 16, 4, 1)
    if block_d <= 64:
        return 128, 64, 8 if has_mask else 4, 3
    if block_d <= 128:
        return 128, 32 if has_mask else 64, 8, 3
    return 64, 32, 8, 2


def bwd_config(block_d: int, dtype: torch.dtype, on_gpu: bool, has_mask: bool = False,
               ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """((BLOCK_M, BLOCK_N, num_warps, num_stages) of the dk/dv kernel, the same of the dq kernel).

    dk/dv: BLOCK_N keys and two float32 BLOCK_N x D accumulators stay in registers while BLOCK_M
    queries stream; dq: the reverse, with one accumulator.
    """
    if not on_gpu:
        return (16, 32, 4, 1), (32, 16, 4, 1)
    if dtype == torch.float32:
        if block_d <= 64:
            return (16, 32, 4, 2), (64, 32, 8, 2)
        return (16, 32, 4, 1), (32, 16, 8, 1)
    if block_d <= 64:
        return (32, 64 if has_mask else 128, 8, 3), (128, 32, 8 if has_mask else 4, 3)
    if block_d <= 128:
        return (32 if has_mask else 64, 32 if has_mask else 64, 8, 3), (64, 32, 8 if has_mask else 4, 3)
    return (16, 32, 4, 1), (32, 16, 4, 1)


def decode_tiles(block_d: int, dtype: torch.dtype, on_gpu: bool, group_rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the decode kernel.

    group_rows = (Hq // Hk) * Tn query rows share one cache. tl.dot wants at least 16 rows; a
    group with fewer (MHA, one new token) pads, which a memory-bound loop does not notice.
    """
    block_m = max(16, min(64, triton.next_power_of_2(max(group_rows, 1))))
    if not on_gpu:
        return block_m, 16, 4, 1
    block_n = 16 if dtype == torch.float32 else 64 if block_d <= 128 else 32
    warps = 8 if block_d * block_m >= 256 * 32 else 4
    return block_m, block_n, warps, 3 if dtype != torch.float32 else 2


def decode_splits(block_n: int, programs: int, Tmax: int, target: int) -> tuple[int, int]:
    """(chunk, num_splits): enough chunks to give the machine `target` programs in all, no more
    than the cache has key blocks. It depends on the capacity Tmax, not on the lengths, which stay
    on the device."""
    kv_blocks = max(1, triton.cdiv(Tmax, block_n))
    splits = max(1, min(MAX_SPLITS, kv_blocks, triton.cdiv(target, max(programs, 1))))
    chunk = triton.cdiv(kv_blocks, splits) * block_n
    return chunk, triton.cdiv(max(Tmax, 1), chunk)


def combine_warps(block_s: int, block_d: int) -> int:
    return 4 if block_s * block_d <= 4096 else 8


# ---------------------------------------------------------------------------------------------
# Launchers


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_name: str = "k") -> tuple[int, ...]:
    for name, t in (("q", q), (kv_name, k), (kv_name.replace("k", "v", 1), v)):
        _check(t.dim() == 4, f"{name} must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
        _check(t.dtype in DTYPES, f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        _check(t.dtype == q.dtype, f"{name} must have dtype {q.dtype} like q, got {t.dtype}")
        _check(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
    B, Hq, Tq, D = q.shape
    Bk, Hk, Tk, Dk = k.shape
    vname = kv_name.replace("k", "v", 1)
    _check(Bk == B and Dk == D, f"{kv_name} must have shape ({B}, Hk, Tk, {D}) to match q {tuple(q.shape)}, "
                                f"got {tuple(k.shape)}")
    _check(tuple(v.shape) == tuple(k.shape), f"{vname} must have the shape of {kv_name} {tuple(k.shape)}, "
                                             f"got {tuple(v.shape)}")
    _check(Hk >= 1 and Hq % Hk == 0, f"the query heads ({Hq}) must be a multiple of the key/value heads ({Hk})")
    _check(1 <= D <= MAX_D, f"head dim D={D} is outside the Triton kernels' range 1..{MAX_D}")
    return B, Hq, Tq, D, Hk, Tk


def _check_mask(mask: torch.Tensor | None, q: torch.Tensor, shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    _check(mask.dtype == torch.float32, f"mask must be a float32 additive bias, got {mask.dtype}")
    _check(tuple(mask.shape) == shape, f"mask must be viewed as (B, Hq, Tq, Tk) = {shape}, got {tuple(mask.shape)}")
    _check(mask.device == q.device, f"mask is on {mask.device} but q is on {q.device}")


def _precision(dtype: torch.dtype, interpret: bool) -> tuple[bool, str]:
    """(UPCAST, input_precision): bf16 dots are wrong in the interpreter, so it gets float32 ones."""
    upcast = interpret and dtype == torch.bfloat16
    return upcast, "ieee" if (dtype == torch.float32 or upcast) else "tf32"


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor):
    if mask is None:
        return q, (0, 0, 0, 0)  # q stands in for the pointer; HAS_MASK keeps the kernel off it
    return mask, tuple(mask.stride())


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32, natural log)."""
    B, Hq, Tq, D, Hk, Tk = _check_qkv(q, k, v)
    _check_mask(mask, q, (B, Hq, Tq, Tk))
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    on_gpu = q.device.type == "cuda"
    block_d = _block_d(D)
    bm, bn, warps, stages = fwd_config(block_d, q.dtype, on_gpu, mask is not None)
    upcast, prec = _precision(q.dtype, _INTERPRET)
    mask_t, (smb, smh, smm, smn) = _mask_args(mask, q)
    num_m = triton.cdiv(Tq, bm)
    _attn_fwd_kernel[(num_m * B * Hq,)](
        q, k, v, mask_t, out, lse,
        Hq, Tq, Tk, D, Hq // Hk, num_m,
        smb, smh, smm, smn,
        float(scale) * 1.4426950408889634,
        IS_CAUSAL=bool(is_causal), HAS_MASK=mask is not None, PAD_D=block_d != D, UPCAST=upcast, PREC=prec,
        WHILE_LOOPS=WHILE_LOOPS, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return out, lse


def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, is_causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) like q, k, v; dk and dv are summed over each GQA group's query heads."""
    B, Hq, Tq, D, Hk, Tk = _check_qkv(q, k, v)
    _check_mask(mask, q, (B, Hq, Tq, Tk))
    for name, t in (("dout", dout), ("out", out)):
        _check(tuple(t.shape) == tuple(q.shape) and t.dtype == q.dtype,
               f"{name} must have q's shape {tuple(q.shape)} and dtype {q.dtype}, got {tuple(t.shape)} {t.dtype}")
        _check(t.device == q.device, f"{name} is on {t.device} but q is on {q.device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
    _check(tuple(lse.shape) == (B, Hq, Tq) and lse.dtype == torch.float32 and lse.is_contiguous(),
           f"lse must be a contiguous float32 tensor of shape {(B, Hq, Tq)}, got {lse.dtype} {tuple(lse.shape)}")
    _check(lse.device == q.device, f"lse is on {lse.device} but q is on {q.device}")

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or Tq == 0 or Tk == 0:  # no (query, key) pair: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    on_gpu = q.device.type == "cuda"
    block_d = _block_d(D)
    (bm1, bn1, w1, s1), (bm2, bn2, w2, s2) = bwd_config(block_d, q.dtype, on_gpu, mask is not None)
    upcast, prec = _precision(q.dtype, _INTERPRET)
    mask_t, (smb, smh, smm, smn) = _mask_args(mask, q)
    flags = dict(IS_CAUSAL=bool(is_causal), HAS_MASK=mask is not None, PAD_D=block_d != D, UPCAST=upcast,
                 PREC=prec, WHILE_LOOPS=WHILE_LOOPS, BLOCK_D=block_d)
    qk_scale = float(scale) * 1.4426950408889634

    delta = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    n_rows = B * Hq * Tq
    _attn_bwd_delta_kernel[(triton.cdiv(n_rows, DELTA_BLOCK_ROWS),)](
        out, dout, delta, n_rows, D, PAD_D=block_d != D, BLOCK_M=DELTA_BLOCK_ROWS, BLOCK_D=block_d, num_warps=4,
    )
    num_n = triton.cdiv(Tk, bn1)
    _attn_bwd_dkdv_kernel[(num_n * B * Hk,)](
        q, k, v, mask_t, dout, lse, delta, dk, dv,
        Hq, Tq, Tk, D, Hq // Hk, num_n,
        smb, smh, smm, smn,
        qk_scale, float(scale),
        BLOCK_M=bm1, BLOCK_N=bn1, num_warps=w1, num_stages=s1, **flags,
    )
    num_m = triton.cdiv(Tq, bm2)
    _attn_bwd_dq_kernel[(num_m * B * Hq,)](
        q, k, v, mask_t, dout, lse, delta, dq,
        Hq, Tq, Tk, D, Hq // Hk, num_m,
        smb, smh, smm, smn,
        qk_scale, float(scale),
        BLOCK_M=bm2, BLOCK_N=bn2, num_warps=w2, num_stages=s2, **flags,
    )
    return dq, dk, dv


def _check_seqlens(cache_seqlens: torch.Tensor, Tn: int, Tmax: int) -> None:
    """Lengths outside [Tn, Tmax], checked without a host read: a decode step must not wait for the
    device (fastlm.ops has checked them already, from host-known bounds where the caller gave them).
    On a CPU torch._assert_async fails at once and the error names the length; on a GPU it is a
    device-side assert, later. The kernel clamps lengths as well, so none reads outside the cache."""
    bad = (cache_seqlens < Tn) | (cache_seqlens > Tmax)
    try:
        torch._assert_async(~bad.any(), f"fastlm.kernels.attention: cache_seqlens must lie in [Tn, Tmax] = "
                                        f"[{Tn}, {Tmax}]")
    except RuntimeError:  # synchronous: a CPU tensor, so reading it waits for nothing
        i = int(bad.nonzero()[0, 0])
        _check(False, f"cache_seqlens[{i}] = {int(cache_seqlens[i])} must lie in [Tn, Tmax] = [{Tn}, {Tmax}]")
        raise


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """out (B, Hq, Tn, D): the Tn newest tokens of each sequence against its first seqlens[b] keys."""
    B, Hq, Tn, D, Hk, Tmax = _check_qkv(q, k_cache, v_cache, "k_cache")
    _check(cache_seqlens.dim() == 1 and cache_seqlens.shape[0] == B,
           f"cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}")
    _check(cache_seqlens.dtype in (torch.int32, torch.int64),
           f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    _check(cache_seqlens.device == q.device, f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    _check(Tn <= Tmax, f"q holds Tn={Tn} new tokens but the cache has room for only Tmax={Tmax}")
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    _check_seqlens(cache_seqlens, Tn, Tmax)

    on_gpu = q.device.type == "cuda"
    block_d = _block_d(D)
    G = Hq // Hk
    group_rows = G * Tn
    bm, bn, warps, stages = decode_tiles(block_d, q.dtype, on_gpu, group_rows)
    num_row_blocks = triton.cdiv(group_rows, bm)
    # About two programs per SM on a GPU; a few chunks under the interpreter, so that the
    # combine kernel runs at test sizes too.
    target = 2 * sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if on_gpu else 8
    chunk, splits = decode_splits(bn, B * Hk * num_row_blocks, Tmax, target)
    upcast, prec = _precision(q.dtype, _INTERPRET)
    single = splits == 1
    if single:
        part, lse = out, out  # the kernel writes the output itself and no lse
    else:
        part = torch.empty((B, Hq, Tn, splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, Hq, Tn, splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(splits * num_row_blocks * B * Hk,)](
        q, k_cache, v_cache, cache_seqlens, part, lse,
        Hq, Tn, Tmax, D, G, chunk, splits, num_row_blocks,
        float(scale) * 1.4426950408889634,
        PAD_D=block_d != D, UPCAST=upcast, PREC=prec, WHILE_LOOPS=WHILE_LOOPS, WRITE_FINAL=single,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    if not single:
        block_s = triton.next_power_of_2(splits)
        _decode_combine_kernel[(B * Hq * Tn,)](
            part, lse, out, splits, D,
            PAD_D=block_d != D, BLOCK_S=block_s, BLOCK_D=block_d,
            num_warps=combine_warps(block_s, block_d),
        )
    return out


# ---------------------------------------------------------------------------------------------
# Compile specs: the variants tools/check_triton.py compiles for sm_90, restating the launchers' choices


_TORCH_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def compile_specs() -> list[Spec]:
    return _prefill_specs() + _decode_specs()


def _prefill_specs() -> list[Spec]:
    # (dtype, D, IS_CAUSAL, HAS_MASK, G, backward too). G = 1 is what an MHA launch specialises;
    # None: GQA, G passed as an integer. Every dtype at the fast head dims, the mask and GQA paths,
    # an odd head dim (padded BLOCK_D, masked columns) and the widest.
    cases = [(dt, D, True, False, 1 if D == 64 else None, True) for dt in SPEC_DTYPES for D in (64, 128)]
    cases += [("fp16", 128, False, True, 1, True), ("bf16", 128, False, True, 1, False),
              ("bf16", 64, True, True, None, True), ("fp32", 64, False, True, 1, False),
              ("fp16", 80, True, True, None, True), ("fp16", 256, True, False, 1, False),
              ("bf16", 256, False, True, None, False), ("bf16", 256, True, False, 1, True)]
    specs = []
    for dt, D, causal, has_mask, G, with_bwd in cases:
        tdt = _TORCH_DT[dt]
        block_d = _block_d(D)
        pad = block_d != D
        bm, bn, warps, st = fwd_config(block_d, tdt, True, has_mask)
        (bm1, bn1, w1, st1), (bm2, bn2, w2, st2) = bwd_config(block_d, tdt, True, has_mask)
        tag = f"{'causal' if causal else 'full'}{',mask' if has_mask else ''}{',gqa' if G is None else ''},D={D}"
        flags = {"IS_CAUSAL": causal, "HAS_MASK": has_mask, "PAD_D": pad, "UPCAST": False,
                 "PREC": "ieee" if dt == "fp32" else "tf32", "WHILE_LOOPS": False, "BLOCK_D": block_d}
        ints = {"Hq": "i32", "Tq": "i32", "Tk": "i32", "D": "i32", "stride_mb": "i32", "stride_mh": "i32",
                "stride_mm": "i32"}
        if G is None:
            ints["G"] = "i32"
        else:
            flags["G"] = G
        if has_mask:
            flags["stride_mn"] = 1  # a row-contiguous bias: a launch specialises the 1
        else:
            ints["stride_mn"] = "i32"
        div = ("Tq", "Tk") if pad else ("Tq", "Tk", "D")  # T a multiple of 16, as training shapes are
        specs.append(Spec(
            f"attn_fwd[{tag}]", dt, _attn_fwd_kernel,
            {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Mask": "*fp32", "Out": f"*{dt}", "Lse": "*fp32",
             "num_m_blocks": "i32", "qk_scale": "fp32", **ints},
            {**flags, "BLOCK_M": bm, "BLOCK_N": bn}, warps, div, num_stages=st,
        ))
        if with_bwd:
            bwd_sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Mask": "*fp32", "DO": f"*{dt}",
                       "Lse": "*fp32", "Delta": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32", **ints}
            specs.append(Spec(
                f"attn_bwd_dkdv[{tag}]", dt, _attn_bwd_dkdv_kernel,
                {**bwd_sig, "DK": f"*{dt}", "DV": f"*{dt}", "num_n_blocks": "i32"},
                {**flags, "BLOCK_M": bm1, "BLOCK_N": bn1}, w1, div, num_stages=st1,
            ))
            specs.append(Spec(
                f"attn_bwd_dq[{tag}]", dt, _attn_bwd_dq_kernel,
                {**bwd_sig, "DQ": f"*{dt}", "num_m_blocks": "i32"},
                {**flags, "BLOCK_M": bm2, "BLOCK_N": bn2}, w2, div, num_stages=st2,
            ))

    for dt, D in [(dt, 128) for dt in SPEC_DTYPES] + [("fp16", 80)]:
        block_d = _block_d(D)
        specs.append(Spec(
            f"attn_bwd_delta[D={D}]", dt, _attn_bwd_delta_kernel,
            {"Out": f"*{dt}", "DOut": f"*{dt}", "Delta": "*fp32", "n_rows": "i32", "D": "i32"},
            {"PAD_D": block_d != D, "BLOCK_M": DELTA_BLOCK_ROWS, "BLOCK_D": block_d}, 4,
            () if block_d != D else ("D",),
        ))
    return specs


def _decode_specs() -> list[Spec]:
    # Decode: (dtype, D, G, Tn, one chunk). One new token of an 8-head GQA group, written as
    # partials or (one chunk) as the output itself; 4 new tokens of an MHA head (speculative decoding).
    decode_cases = [(dt, 128, None, 1, False) for dt in SPEC_DTYPES]
    decode_cases += [("fp16", 128, None, 1, True), ("fp16", 64, 1, 4, False), ("bf16", 80, None, 1, False),
                     ("bf16", 256, None, 1, False)]
    specs = []
    for dt, D, G, Tn, final in decode_cases:
        block_d = _block_d(D)
        pad = block_d != D
        bm, bn, warps, st = decode_tiles(block_d, _TORCH_DT[dt], True, (G or 8) * Tn)
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Seqlens": "*i32",
               "Out": f"*{dt}" if final else "*fp32", "Lse": "*fp32",
               "Hq": "i32", "Tmax": "i32", "D": "i32", "chunk": "i32", "qk_scale": "fp32"}
        consts = {"PAD_D": pad, "UPCAST": False, "PREC": "ieee" if dt == "fp32" else "tf32", "WHILE_LOOPS": False,
                  "WRITE_FINAL": final, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "num_row_blocks": 1}
        for name, val in (("G", G), ("Tn", Tn), ("num_splits", 1 if final else None)):
            if val is None:
                sig[name] = "i32"
            else:
                consts[name] = val
        specs.append(Spec(
            f"attn_decode[{'final' if final else 'split'},G={G or 'n'},Tn={Tn},D={D}]", dt,
            _decode_split_kernel, sig, consts, warps,
            ("Tmax", "chunk") if pad else ("Tmax", "chunk", "D"), num_stages=st,
        ))
    for dt, D, block_s in [(dt, 128, MAX_SPLITS) for dt in SPEC_DTYPES] + [("fp16", 80, 4)]:
        block_d = _block_d(D)
        specs.append(Spec(
            f"attn_decode_combine[S={block_s},D={D}]", dt, _decode_combine_kernel,
            {"Part": "*fp32", "Lse": "*fp32", "Out": f"*{dt}", "num_splits": "i32", "D": "i32"},
            {"PAD_D": block_d != D, "BLOCK_S": block_s, "BLOCK_D": block_d},
            combine_warps(block_s, block_d), () if block_d != D else ("D",),
        ))
    return specs
