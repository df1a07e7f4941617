"""Scaled dot-product attention, flash style, and attention against a KV cache for decoding.

    scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, backend=None)
    decode_attention(q, k_cache, v_cache, cache_seqlens, *, scale=None, backend=None)

The first mirrors torch.nn.functional.scaled_dot_product_attention. On the fastlm backends the
forward keeps only the log-sum-exp of each query row (O(T) extra memory), and the backward
recomputes the attention probabilities block by block from it: no Tq x Tk tensor is ever held.
A mask is turned into a float32 additive bias in its own (broadcast) shape and handed to the
kernels as an expanded view, so a key-padding mask (B, 1, 1, Tk) costs B x Tk floats, not B x Tq x Tk.

Calls that the fused kernels do not cover run on the torch path, which gives torch's own results:
dropout_p > 0 (the kernels have no dropout RNG), a value head dim different from the query's, a
mask that requires grad or is float64, inputs with other than 3 or 4 dims, and empty inputs.
Batch dims that broadcast (query (4, 3, 8) against key (4, 4, 6, 8)) are expanded on the host, so
the kernels see one batch shape.

decode_attention is the step of autoregressive generation: the newest Tn tokens of each sequence
attend to the first cache_seqlens[b] positions of a preallocated cache, causally aligned to the
end. GPU backends split the cache across programs (flash-decoding). It has no backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._dispatch import kernel_op

# Head dims the GPU kernels are built for; the CPU kernel takes any.
GPU_HEAD_DIMS = (16, 256)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# --- the kernels -------------------------------------------------------------------------------


@kernel_op("attention")
def attention_fwd(
    lib, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float
) -> tuple[Tensor, Tensor]:
    """(out, lse) for q (B, Hq, Tq, D), k and v (B, Hk, Tk, D); see csrc/fastlm.h for the contract."""
    return lib.attention_fwd(q, k, v, mask, is_causal, scale)


@attention_fwd.register_fake
def _(q, k, v, mask, is_causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@kernel_op("attention")
def attention_bwd(
    lib, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
    is_causal: bool, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of attention_fwd."""
    return lib.attention_bwd(dout, q, k, v, out, lse, mask, is_causal, scale)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if ctx.backend == "cuda" and torch.are_deterministic_algorithms_enabled():
        _cuda_backward_is_not_deterministic()
    dq, dk, dv = attention_bwd.via(ctx)(dout.contiguous(), q, k, v, out, lse, mask, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_setup_context, _backward, nondiff_outputs=(1,))


def _cuda_backward_is_not_deterministic() -> None:
    # As torch does for its own nondeterministic kernels: an error, or a warning under warn_only.
    msg = ("scaled_dot_product_attention: the cuda backend's backward sums dQ with float atomics, whose "
           "order varies from run to run, but torch.use_deterministic_algorithms(True) is set; use "
           "backend='triton' (no atomics), 'cpu' or 'torch', or use_deterministic_algorithms(True, warn_only=True)")
    if not torch.is_deterministic_algorithms_warn_only_enabled():
        raise RuntimeError(msg)
    import warnings

    warnings.warn(msg, stacklevel=3)


@kernel_op("attention", name="decode_attention")
def decode_attention_op(
    lib, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float
) -> Tensor:
    """out (B, Hq, Tn, D) of the Tn newest queries against the cache; see csrc/fastlm.h."""
    return lib.decode_attention(q, k_cache, v_cache, cache_seqlens, scale)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale):
    return torch.empty_like(q)


# --- argument checks --------------------------------------------------------------------------


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool) -> tuple[Tensor, Tensor, Tensor]:
    """query, key and value with their batch dims broadcast to one shape (expanded views), as
    torch broadcasts them. With enable_gqa and unequal heads, dim -3 holds the heads, and key and
    value keep theirs, a divisor of the query's."""
    _checks.tensor(op, "query", q)
    _checks.like(op, "key", k, q, "query")
    _checks.like(op, "value", v, q, "query")
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise ValueError(
            f"{op}: query, key and value must have at least 2 dims (..., T, head dim), got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: key's head dim {k.shape[-1]} differs from query's {q.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: key {tuple(k.shape)} and value {tuple(v.shape)} must have the same length (dim -2)")
    gqa = enable_gqa and min(q.dim(), k.dim(), v.dim()) >= 3 and q.shape[-3] != k.shape[-3]
    lead = 3 if gqa else 2
    if gqa:
        hq, hk = q.shape[-3], k.shape[-3]
        if v.shape[-3] != hk:
            raise ValueError(f"{op}: key has {hk} heads but value has {v.shape[-3]}")
        if hk == 0 or hq % hk:
            raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    try:
        batch = torch.broadcast_shapes(q.shape[:-lead], k.shape[:-lead], v.shape[:-lead])
    except RuntimeError:
        hint = ""
        if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] and q.shape[-3] % k.shape[-3] == 0 and not enable_gqa:
            hint = f"; query has {q.shape[-3]} heads and key/value {k.shape[-3]}: pass enable_gqa=True " \
                   "for grouped-query attention"
        raise ValueError(
            f"{op}: the batch dims of query {tuple(q.shape)}, key {tuple(k.shape)} and value "
            f"{tuple(v.shape)} do not broadcast{hint}"
        ) from None
    heads = (q.shape[-3],) if gqa else ()
    kv_heads = (k.shape[-3],) if gqa else ()
    q = q.expand(*batch, *heads, *q.shape[-2:])
    k = k.expand(*batch, *kv_heads, *k.shape[-2:])
    v = v.expand(*batch, *kv_heads, *v.shape[-2:])
    return q, k, v


def _check_mask(op: str, mask, q: Tensor, k: Tensor) -> None:
    """The mask must broadcast to the full (..., Hq, Tq, Tk) score shape."""
    full = (*q.shape[:-1], k.shape[-2])
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{op}: attn_mask must be boolean or floating point, got dtype {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{op}: attn_mask is on {mask.device} but query is on {q.device}")
    try:
        if torch.broadcast_shapes(mask.shape, full) != full:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"{op}: attn_mask of shape {tuple(mask.shape)} does not broadcast to (..., Hq, Tq, Tk) = {full}"
        ) from None


def _additive(mask: Tensor, full4: tuple[int, int, int, int]) -> Tensor:
    """The mask as a float32 additive bias, expanded (not copied) to full4 = (B, Hq, Tq, Tk)."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias.masked_fill_(~mask, float("-inf"))
    else:
        bias = mask.to(torch.float32)
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if bias.shape[-1] > 1 and bias.stride(-1) != 1:
        bias = bias.contiguous()
    return bias.expand(full4)


def _gpu_head_dim_ok(backend: str, d: int) -> bool:
    return backend not in ("cuda", "triton") or GPU_HEAD_DIMS[0] <= d <= GPU_HEAD_DIMS[1]


def _head_dim_error(op: str, backend: str, d: int) -> str:
    return f"{op}: backend {backend!r} supports head dims {GPU_HEAD_DIMS[0]}..{GPU_HEAD_DIMS[1]}, got {d}"


# --- the public functions ---------------------------------------------------------------------


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
    backend: str | None = None,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, on the chosen backend."""
    op = "scaled_dot_product_attention"
    # The kernels take one batch shape; torch broadcasts batch dims, so they are expanded here.
    query, key, value = _check_qkv(op, query, key, value, enable_gqa)
    if attn_mask is not None:
        _check_mask(op, attn_mask, query, key)
        if is_causal:
            raise ValueError(f"{op}: pass either attn_mask or is_causal=True, not both (as torch requires)")
    _checks.real(op, "dropout_p", dropout_p)
    if scale is not None:
        _checks.real(op, "scale", scale)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    chosen = backends.choose(op, query.device, backend)
    explicit = backend is not None or backends.requested_backend() is not None

    d = query.shape[-1]
    fused = (
        chosen != "torch"
        and dropout_p == 0.0
        and value.shape[-1] == d
        and query.dim() in (3, 4)
        and query.numel() > 0 and key.numel() > 0
        and not (attn_mask is not None and attn_mask.requires_grad)
        # The kernels read a float32 bias: a float64 mask would lose digits a float64 caller wants.
        and not (attn_mask is not None and attn_mask.dtype == torch.float64)
    )
    if fused and not _gpu_head_dim_ok(chosen, d):
        if explicit:
            raise ValueError(_head_dim_error(op, chosen, d))
        fused = False
    if not fused:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    _checks.backend_dtype(op, chosen, query)

    three = query.dim() == 3
    q, k, v = (t.unsqueeze(0) if three else t for t in (query, key, value))
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), mask, is_causal, s)
    out, _ = attention_fwd(*args, backend=chosen)
    return out.squeeze(0) if three else out


def _decode_reference(q, k_cache, v_cache, cache_seqlens, scale):
    b, _, tn, _ = q.shape
    tmax = k_cache.shape[2]
    # Query i of sequence b sits at position seqlens[b] - Tn + i and sees keys up to it.
    pos = cache_seqlens.view(b, 1, 1).to(torch.long) - tn + torch.arange(tn, device=q.device).view(1, tn, 1)
    slots = torch.arange(tmax, device=q.device)
    mask = slots.view(1, 1, tmax) <= pos
    # Slots past a sequence's length hold whatever was there (NaN, Inf): a masked score is -inf,
    # but 0 * NaN in the value product and NaN + -inf in the scores are NaN, so they are zeroed.
    valid = (slots.view(1, tmax) < cache_seqlens.view(b, 1).to(torch.long)).view(b, 1, tmax, 1)
    k_cache = torch.where(valid, k_cache, 0)
    v_cache = torch.where(valid, v_cache, 0)
    return F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1]
    )


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: float | None = None,
    backend: str | None = None, seqlen_range: tuple[int, int] | None = None,
) -> Tensor:
    """Attention of the Tn newest tokens of each sequence against its KV cache.

    q (B, Hq, Tn, D); k_cache and v_cache (B, Hk, Tmax, D) with Hq a multiple of Hk, already holding
    cache_seqlens[b] valid positions of sequence b (the new tokens included); cache_seqlens (B)
    int32 or int64 with Tn <= cache_seqlens[b] <= Tmax. Query i of sequence b attends to cache
    positions 0 .. cache_seqlens[b] - Tn + i. Returns (B, Hq, Tn, D). Forward only.

    The bounds on cache_seqlens are checked by reading its min and max, which on a GPU waits for
    the device once a call. A caller that knows them on the host (fastlm.nn's KVCache does) passes
    seqlen_range = (min, max) instead: those are checked, and cache_seqlens must lie within them.
    """
    op = "decode_attention"
    _checks.tensor(op, "q", q)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D (B, Hq, Tn, D), got shape {tuple(q.shape)}")
    _checks.like(op, "k_cache", k_cache, q, "q")
    _checks.like(op, "v_cache", v_cache, q, "q", shape=k_cache.shape)
    b, hq, tn, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(
            f"{op}: k_cache must be (B, Hk, Tmax, D) = ({b}, Hk, Tmax, {d}), got shape {tuple(k_cache.shape)}"
        )
    hk, tmax = k_cache.shape[1], k_cache.shape[2]
    if d == 0:
        raise ValueError(f"{op}: q's head dim (its last dim) must be positive, got shape {tuple(q.shape)}")
    if scale is not None:
        _checks.real(op, "scale", scale)
    if hk == 0 or hq % hk:
        raise ValueError(f"{op}: q's heads ({hq}) must be a multiple of the cache's heads ({hk})")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: cache_seqlens must be an int32 or int64 tensor")
    if cache_seqlens.shape != (b,) or cache_seqlens.device != q.device:
        raise ValueError(
            f"{op}: cache_seqlens must have shape ({b},) on {q.device}, got {tuple(cache_seqlens.shape)} "
            f"on {cache_seqlens.device}"
        )
    if b and not torch.compiler.is_compiling():
        if seqlen_range is not None:
            lo, hi = (int(t) for t in seqlen_range)
            got = f"seqlen_range ({lo}, {hi})"
        else:
            lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
            got = f"values in [{lo}, {hi}]"
        if lo > hi or lo < tn or hi > tmax:
            raise ValueError(f"{op}: cache_seqlens must lie in [Tn, Tmax] = [{tn}, {tmax}], got {got}")
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    chosen = backends.choose(op, q.device, backend)
    explicit = backend is not None or backends.requested_backend() is not None
    if chosen != "torch" and not _gpu_head_dim_ok(chosen, d):
        if explicit:
            raise ValueError(_head_dim_error(op, chosen, d))
        chosen = "torch"
    if chosen == "torch" or q.numel() == 0:
        return _decode_reference(q, k_cache, v_cache, cache_seqlens, s)
    _checks.backend_dtype(op, chosen, q)
    args = (q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), cache_seqlens.contiguous(), s)
    return decode_attention_op(*args, backend=chosen)
