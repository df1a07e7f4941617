"""Weight-only quantized linear in Triton: y = x dequant(W)^T + bias, int8 or int4 weights.

The launcher follows the contract of csrc/fastlm.h (quant_matmul_cpu), which fastlm/quant.py
documents in full: x (M, K) float16, bfloat16 or float32; int8: qweight int8 (N, K) with one
float32 scale per row; int4: qweight uint8 (N, K / 2), element k of row n in byte k / 2 (low
nibble for even k, high for odd k), scales float32 (N, K / G), zeros float32 of that shape or
None (zero 8). W[n, k] = (q - zero) * scale. Accumulation is float32; no float copy of W is made.

Two regimes, because decoding (a handful of rows of x) and prefill/training (many rows) are
limited by different things:

- M <= GEMV_MAX_M: memory-bound on the weights. Each program owns BLOCK_N rows of W and walks a
  range of K, reading every weight byte once, unpacking in registers and multiply-adding in float32
  against all M rows of x at once. When the N blocks alone cannot fill the GPU, K is split across
  programs (split-K): each writes a float32 partial (M, N) and a small kernel sums them in a fixed
  order, adds the bias and casts (deterministic, no atomics).
- M > GEMV_MAX_M: a tiled GEMM. Each K step dequantizes a (BLOCK_N, BLOCK_K) tile of W in
  registers, rounds it to x's dtype and feeds tl.dot (tensor cores for float16/bfloat16, float32
  accumulate; "ieee" float32 dot for float32 x). Split-K again when the tiles are too few.

int4 tiles never straddle a quantization group: BLOCK_K divides G, so each (row, tile) has one
scale and one zero. int8 has one scale per row, applied once to the accumulated row sum (the
int8 values themselves are exact in every float dtype).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._common import checker, sm_count
from ._spec import SPEC_DTYPES, Spec

_check = checker("quant_matmul")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUP_SIZES = (32, 64, 128)
GEMV_MAX_M = 8
# GEMV: the float32 product x[m, k] * w[n, k] of one step has BLOCK_M * BLOCK_N * BLOCK_K elements;
# this many per program (with 4 warps) keeps it at 64 registers a thread.
GEMV_PRODUCT = 8192
GEMV_WARPS = 4
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_w_tile(Qw, S, Z, n, n_mask, k0, K, q_stride,
                 BITS: tl.constexpr, HAS_Z: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_N, BLOCK_K) tile of W at rows n, columns k0.., as float32.

    int8: the raw values (the row scale is applied by the caller). int4: (q - zero) * scale, with
    the one group [k0, k0 + BLOCK_K) lies in (BLOCK_K divides G). Columns past K load as zero.
    q_stride is the row pitch of Qw in bytes (K or K / 2), passed on its own so that a launch
    sees it divisible by 16 and the compiler can prove rows 16-byte aligned (K // 2 would not).
    """
    n64 = n.to(tl.int64)  # N * K passes 2**31 for large layers
    if BITS == 8:
        kk = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(Qw + n64[:, None] * q_stride + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0)
        w = q.to(tl.float32)
    else:
        # BLOCK_K / 2 bytes a row, contiguous: one wide load. Byte j holds k = 2j (low nibble) and
        # 2j + 1 (high nibble); join + reshape puts them back in k order.
        kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(Qw + n64[:, None] * q_stride + kb[None, :], mask=n_mask[:, None] & (kb < K // 2)[None, :],
                    other=0)
        q = tl.reshape(tl.join(b & 15, b >> 4), (b.shape[0], BLOCK_K))
        # Clamped group index: a step past K (masked above) still reads a valid scale.
        g = tl.minimum(k0, K - 1) // GROUP
        num_groups = K // GROUP
        s = tl.load(S + n64 * num_groups + g, mask=n_mask, other=0.0)
        if HAS_Z:
            z = tl.load(Z + n64 * num_groups + g, mask=n_mask, other=0.0)
        else:
            z = tl.full(s.shape, 8.0, tl.float32)
        w = (q.to(tl.float32) - z[:, None]) * s[:, None]
    return w


@triton.jit
def _store_out(acc, Y, P, B, m, n, M, N, pid_k,
               BITS: tl.constexpr, HAS_B: tl.constexpr, SPLIT: tl.constexpr, S, n_mask):
    """acc (BLOCK_M, BLOCK_N) float32 -> y (or this split's float32 partial)."""
    if BITS == 8:
        acc = acc * tl.load(S + n, mask=n_mask, other=0.0)[None, :]
    mask = (m < M)[:, None] & n_mask[None, :]
    offs = m.to(tl.int64)[:, None] * N + n[None, :]
    if SPLIT:
        tl.store(P + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        if HAS_B:
            acc += tl.load(B + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _qmm_gemv_kernel(
    X, Qw, S, Z, B, Y, P,
    M, N, K, q_stride, k_split, steps,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_B: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m_mask = m < M
    k_start = pid_k * k_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # `steps` (a launch argument, not a tensor bound) keeps this a counted loop the compiler can
    # pipeline; the last split's steps past K are masked.
    for i in range(0, steps):
        k0 = k_start + i * BLOCK_K
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * K + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                    other=0.0).to(tl.float32)
        w = _load_w_tile(Qw, S, Z, n, n_mask, k0, K, q_stride, BITS, HAS_Z, GROUP, BLOCK_K)
        # Every row of x against the same weights: the weights are read once for all M rows.
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    _store_out(acc, Y, P, B, m, n, M, N, pid_k, BITS, HAS_B, SPLIT, S, n_mask)


@triton.jit
def _qmm_gemm_kernel(
    X, Qw, S, Z, B, Y, P,
    M, N, K, q_stride, k_split, steps,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_B: tl.constexpr,
    SPLIT: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m_mask = m < M
    x_rows = X + m.to(tl.int64)[:, None] * K
    k_start = pid_k * k_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, steps):
        k0 = k_start + i * BLOCK_K
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        w = _load_w_tile(Qw, S, Z, n, n_mask, k0, K, q_stride, BITS, HAS_Z, GROUP, BLOCK_K)
        if F32_DOT:
            # float32 x, or bfloat16 under the interpreter (whose bf16 dot is wrong).
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            # Rounded to x's dtype, as the unfused dequantize-then-matmul rounds it.
            acc = tl.dot(x, tl.trans(w.to(X.dtype.element_ty)), acc)
    _store_out(acc, Y, P, B, m, n, M, N, pid_k, BITS, HAS_B, SPLIT, S, n_mask)


@triton.jit
def _qmm_reduce_kernel(P, B, Y, MN, N, splits, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):  # a fixed order: the result does not depend on scheduling
        acc += tl.load(P + s * MN + offs, mask=mask, other=0.0)
    if HAS_B:
        acc += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration


REDUCE_BLOCK = 1024


def gemv_config(M: int, bits: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for M <= GEMV_MAX_M."""
    block_m = triton.next_power_of_2(max(M, 1))
    # int4: a whole group a step when the product allows (BLOCK_K must divide G); int8: 128
    # columns, 128 bytes a row.
    block_k = group_size if bits == 4 else 128
    while block_m * 16 * block_k > GEMV_PRODUCT and block_k > 32:
        block_k //= 2
    block_n = max(16, min(128, GEMV_PRODUCT // (block_m * block_k)))
    return block_m, block_n, block_k


def gemm_config(M: int, N: int, bits: int, group_size: int, fp32: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M > GEMV_MAX_M."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 128 if M > 64 else 64
    if fp32:  # no tensor cores: a 128 x 128 float32 tile spills
        block_m, block_n = min(block_m, 64), 64
    block_k = min(group_size, 64) if bits == 4 else 64
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, num_warps, 3


@functools.cache
def _num_splits(x: torch.Tensor, tiles: int, K: int, block_k: int) -> int:
    """How many ways to split K so that about two programs per SM run, each >= 4 steps long."""
    if x.device.type == "cuda":
        sms = sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        sms = 2  # the interpreter: few programs, but still the split path for small outputs
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, triton.cdiv(K, 4 * block_k), 32))


def _check_args(x, qweight, scales, zeros, bias, bits, group_size) -> tuple[int, int, int]:
    _check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    _check(x.dim() == 2, f"x must be 2-D (M, K), got shape {tuple(x.shape)}")
    _check(x.dtype in DTYPES, f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check(x.is_contiguous(), "x must be contiguous")
    M, K = x.shape
    _check(qweight.dim() == 2, f"qweight must be 2-D, got shape {tuple(qweight.shape)}")
    N = qweight.shape[0]
    if bits == 8:
        _check(qweight.dtype == torch.int8, f"qweight must be int8 for bits=8, got {qweight.dtype}")
        _check(qweight.shape[1] == K, f"qweight must have shape (N, {K}) for x of shape {tuple(x.shape)}, "
                                      f"got {tuple(qweight.shape)}")
        _check(group_size == K, f"group_size must equal K={K} for bits=8, got {group_size}")
        _check(zeros is None, "zeros must be None for bits=8 (symmetric)")
    else:
        _check(qweight.dtype == torch.uint8, f"qweight must be uint8 for bits=4, got {qweight.dtype}")
        _check(group_size in GROUP_SIZES, f"group_size must be one of {GROUP_SIZES} for bits=4, got {group_size}")
        _check(K % group_size == 0, f"K={K} must be a multiple of group_size={group_size}")
        _check(qweight.shape[1] * 2 == K, f"qweight must have shape (N, {K // 2}) for x of shape "
                                          f"{tuple(x.shape)}, got {tuple(qweight.shape)}")
    num_groups = K // group_size if group_size else 0
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        _check(t.dtype == torch.float32, f"{name} must be float32, got {t.dtype}")
        _check(tuple(t.shape) == (N, num_groups), f"{name} must have shape {(N, num_groups)}, got {tuple(t.shape)}")
    if bias is not None:
        _check(bias.dtype == x.dtype, f"bias must have dtype {x.dtype} like x, got {bias.dtype}")
        _check(tuple(bias.shape) == (N,), f"bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is None:
            continue
        _check(t.device == x.device, f"{name} is on {t.device} but x is on {x.device}")
        _check(t.is_contiguous(), f"{name} must be contiguous")
    return M, N, K


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """y (M, N) in x's dtype. split_k forces the number of K splits (tests); None chooses."""
    _check(scales is not None, "scales is required")
    M, N, K = _check_args(x, qweight, scales, zeros, bias, bits, group_size)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:  # an empty sum
        return y.copy_(bias.expand(M, N)) if bias is not None else y.zero_()
    if INTERPRET and x.dtype == torch.bfloat16:
        # The interpreter casts float32 to bfloat16 by truncation, not round-to-nearest as a GPU
        # does: write float32 and let torch round.
        out = torch.empty((M, N), dtype=torch.float32, device=x.device)
        _launch(x, qweight, scales, zeros, bias, bits, group_size, split_k, out)
        return y.copy_(out)
    _launch(x, qweight, scales, zeros, bias, bits, group_size, split_k, y)
    return y


def _launch(x, qweight, scales, zeros, bias, bits, group_size, split_k, y) -> None:
    (M, K), N = x.shape, qweight.shape[0]

    if M <= GEMV_MAX_M:
        block_m, block_n, block_k = gemv_config(M, bits, group_size)
        tiles, num_warps, num_stages = triton.cdiv(N, block_n), GEMV_WARPS, 3
    else:
        block_m, block_n, block_k, num_warps, num_stages = gemm_config(M, N, bits, group_size, x.dtype == torch.float32)
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = split_k if split_k is not None else _num_splits(x, tiles, K, block_k)
    _check(splits >= 1, f"split_k must be at least 1, got {splits}")
    # Every split a whole number of BLOCK_K steps (so int4 steps stay inside a group); a split
    # count that would leave the last ones empty is lowered.
    steps = triton.cdiv(triton.cdiv(K, splits), block_k)
    k_split = steps * block_k
    splits = triton.cdiv(K, k_split)
    split = splits > 1
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if split else y

    # Absent tensors still need a pointer argument; the constexpr flags keep the kernel off them.
    args = (x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else y, y, part,
            M, N, K, qweight.shape[1], k_split, steps)
    flags = dict(BITS=bits, GROUP=group_size if bits == 4 else 1, HAS_Z=zeros is not None,
                 HAS_B=bias is not None, SPLIT=split)
    if M <= GEMV_MAX_M:
        _qmm_gemv_kernel[(triton.cdiv(N, block_n), splits)](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages,
        )
    else:
        f32_dot = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        _qmm_gemm_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)](
            *args, **flags, F32_DOT=f32_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps, num_stages=num_stages,
        )
    if split:
        _qmm_reduce_kernel[(triton.cdiv(M * N, REDUCE_BLOCK),)](
            part, bias if bias is not None else y, y, M * N, N, splits,
            HAS_B=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )


# ---------------------------------------------------------------------------------------------
# Compile specs: the variants tools/check_triton.py compiles for sm_90, restating the launchers' choices


def compile_specs() -> list[Spec]:
    specs = []
    # (bits, group size, zeros): int8 per channel, int4 symmetric at the smallest group, int4
    # asymmetric at the largest.
    formats = ((8, 0, False), (4, 32, False), (4, 128, True))
    for dt in SPEC_DTYPES:
        for bits, group, has_z in formats:
            qtype = "*i8" if bits == 8 else "*u8"
            sig = {"X": f"*{dt}", "Qw": qtype, "S": "*fp32", "Z": "*fp32", "B": f"*{dt}", "Y": f"*{dt}",
                   "P": "*fp32", "M": "i32", "N": "i32", "K": "i32", "q_stride": "i32", "k_split": "i32",
                   "steps": "i32"}
            fmt = f"int{bits}" + (f",g{group}" if bits == 4 else "") + (",zeros" if has_z else "")
            flags = {"BITS": bits, "GROUP": group if bits == 4 else 1, "HAS_Z": has_z}
            # Decode (GEMV) at both ends of its M range, split and not; the GEMM with small and
            # large M tiles. Bias on in one of each pair, so both epilogues compile.
            for M, split in ((1, True), (8, False)):
                block_m, block_n, block_k = gemv_config(M, bits, group)
                specs.append(Spec(
                    f"qmm_gemv[{fmt},M={M}{',split' if split else ',bias'}]", dt, _qmm_gemv_kernel, sig,
                    {**flags, "HAS_B": not split, "SPLIT": split,
                     "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                    GEMV_WARPS, ("N", "K", "q_stride", "k_split"),
                ))
            for M, split in ((16, True), (512, False)):
                block_m, block_n, block_k, warps, _ = gemm_config(M, 4096, bits, group, dt == "fp32")
                specs.append(Spec(
                    f"qmm_gemm[{fmt},M={M}{',split' if split else ',bias'}]", dt, _qmm_gemm_kernel, sig,
                    {**flags, "HAS_B": not split, "SPLIT": split, "F32_DOT": dt == "fp32",
                     "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                    warps, ("N", "K", "q_stride", "k_split"),
                ))
        for has_b in (False, True):
            specs.append(Spec(
                f"qmm_reduce[{'bias' if has_b else 'no bias'}]", dt, _qmm_reduce_kernel,
                {"P": "*fp32", "B": f"*{dt}", "Y": f"*{dt}", "MN": "i32", "N": "i32", "splits": "i32"},
                {"HAS_B": has_b, "BLOCK": REDUCE_BLOCK}, 4, ("MN", "N"),
            ))
    return specs
