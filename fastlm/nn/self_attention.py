"""Causal self-attention for a decoder-only Transformer, with rotary positions and a KV cache.

    attn = CausalSelfAttention(d_model=256, n_head=8, n_kv_head=2, rotary=True, max_seq_len=1024)
    y = attn(x)                                  # training / full-sequence forward, x (B, T, C)
    cache = attn.new_cache(batch=B, max_len=256)
    y = attn(prompt, cache); y = attn(next_token, cache)   # incremental decoding

One fused Linear makes queries, keys and values; keys and values may have fewer heads than
queries (grouped-query attention). Without a cache the layer runs
fastlm.ops.scaled_dot_product_attention(is_causal=True); with one it writes the new keys and
values into the cache and runs fastlm.ops.decode_attention over everything cached so far.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlm import ops


class KVCache:
    """Preallocated keys and values of one attention layer: k, v (B, Hk, Tmax, D) and seqlens (B),
    the number of positions already written for each sequence (the lengths decode_attention
    reads; append and reset keep them equal)."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, *,
                 device=None, dtype=None):
        if min(batch, n_kv_head, max_len, head_dim) <= 0:
            raise ValueError(f"KVCache: batch, n_kv_head, max_len and head_dim must be positive, got "
                             f"{batch}, {n_kv_head}, {max_len}, {head_dim}")
        self.k = torch.zeros(batch, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        # Every sequence advances by the same Tn per append, so the longest one is known on the
        # host without reading seqlens back from the device.
        self.longest = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        self.seqlens.zero_()
        self.longest = 0

    def append(self, k: Tensor, v: Tensor) -> None:
        """Write k, v (B, Hk, Tn, D) at each sequence's next positions and advance seqlens."""
        b, h, tn, d = k.shape
        if (b, h, d) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]) or v.shape != k.shape:
            raise ValueError(f"KVCache.append: k {tuple(k.shape)} and v {tuple(v.shape)} do not fit a cache "
                             f"of shape {tuple(self.k.shape)}")
        if self.longest + tn > self.max_len:
            raise ValueError(f"KVCache.append: {tn} new positions overflow the cache of {self.max_len} "
                             f"(already holding up to {self.longest})")
        # Every sequence starts empty and advances by the same Tn, so all are `longest` long and
        # the new positions are one slice (which torch.compile also handles, unlike a scatter).
        start = self.longest
        self.k[:, :, start:start + tn] = k
        self.v[:, :, start:start + tn] = v
        self.seqlens += tn
        self.longest += tn


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) of q and k in the rotate-half layout, by
    fastlm.ops.rotary_embedding's position form: the angles (float64, position * theta^(-2i / D))
    are made inside the kernel, so no cos/sin tables are kept or read."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"Rotary: head_dim must be even, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta

    def forward(self, q: Tensor, k: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) by positions 0..T-1, or by positions (B, T)."""
        t = q.shape[2]
        if positions is None:
            if t > self.max_seq_len:
                raise ValueError(f"Rotary: sequence length {t} exceeds max_seq_len {self.max_seq_len}")
            positions = torch.arange(t, device=q.device)
        return ops.rotary_embedding(q, k, position_ids=positions, theta=self.theta)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int | None = None, *, bias: bool = True,
                 dropout: float = 0.0, rotary: bool = False, max_seq_len: int = 1024,
                 rope_theta: float = 10000.0, causal: bool = True, device=None, dtype=None):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if d_model % n_head:
            raise ValueError(f"CausalSelfAttention: d_model {d_model} must be divisible by n_head {n_head}")
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise ValueError(f"CausalSelfAttention: n_head {n_head} must be a multiple of n_kv_head {n_kv_head}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        self.dropout, self.causal = dropout, causal
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias, **kw)
        self.proj = nn.Linear(d_model, d_model, bias=bias, **kw)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = Rotary(self.head_dim, max_seq_len, rope_theta) if rotary else None

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        w = self.qkv.weight
        return KVCache(batch, self.n_kv_head, max_len, self.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)

    def forward(self, x: Tensor, cache: KVCache | None = None, *, attn_mask: Tensor | None = None) -> Tensor:
        """attn_mask: for a bidirectional layer (causal=False), a boolean mask that broadcasts to
        (B, H, T, T), True where a query may attend to a key, e.g. key padding as (B, 1, 1, T)."""
        b, t, c = x.shape
        if attn_mask is not None and (self.causal or cache is not None):
            raise ValueError("CausalSelfAttention: attn_mask is for a bidirectional layer (causal=False) "
                             "without a cache")
        hq, hk, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([hq * d, hk * d, hk * d], dim=-1)
        q = q.view(b, t, hq, d).transpose(1, 2)
        k = k.view(b, t, hk, d).transpose(1, 2)
        v = v.view(b, t, hk, d).transpose(1, 2)
        if cache is None:
            if self.rotary is not None:
                q, k = self.rotary(q, k)
            y = ops.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=self.causal, enable_gqa=hq != hk)
        else:
            if self.rotary is not None:
                pos = cache.seqlens.long()[:, None] + torch.arange(t, device=x.device)
                q, k = self.rotary(q, k, pos)
            cache.append(k, v)
            # Every sequence is `longest` long: the op need not read the lengths back to check them.
            y = ops.decode_attention(q, cache.k, cache.v, cache.seqlens,
                                     seqlen_range=(cache.longest, cache.longest))
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))
