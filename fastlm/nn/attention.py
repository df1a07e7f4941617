"""MultiheadAttention: torch.nn.MultiheadAttention running fastlm's fused attention.

It subclasses the torch module and adds no state: constructor arguments, parameter names and
state_dict are torch's, and fastlm.patch swaps the class in place.

The fused path projects q, k and v, runs fastlm.ops.scaled_dot_product_attention and projects
the output. It covers need_weights=False with kdim == vdim == embed_dim and neither add_bias_kv
nor add_zero_attn; anything else (need_weights=True above all, torch's default) runs torch's own
forward and gives torch's results. Masks keep torch's conventions: a boolean key_padding_mask or
attn_mask marks with True the positions NOT to attend; float masks are added to the scores. A
key_padding_mask alone reaches the kernels as a (B, 1, 1, S) bias: no L x S tensor is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import ops


def _as_bias(mask: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """torch's MHA mask convention (bool True = masked out, float = added) as an additive bias."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"MultiheadAttention: {name} must be boolean or floating point, got dtype {mask.dtype}")
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    def _fused_ok(self, need_weights: bool) -> bool:
        return (
            not need_weights
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
        )

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._fused_ok(need_weights):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "MultiheadAttention: is_causal=True is a hint that attn_mask is the causal mask; pass attn_mask too"
            )
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "MultiheadAttention: query, key and value must all be 3-D (batched) or 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # Now (L, B, E) as in torch's functional form.
        tq, b, e = query.shape
        tk = key.shape[0]
        if e != self.embed_dim:
            raise ValueError(f"MultiheadAttention: query's last dim {e} differs from embed_dim {self.embed_dim}")
        if key.shape[:2] != (tk, b) or value.shape[:2] != (tk, b):
            raise ValueError(
                f"MultiheadAttention: key {tuple(key.shape)} and value {tuple(value.shape)} do not match query "
                f"{tuple(query.shape)} in batch size"
            )
        h, hd = self.num_heads, self.head_dim

        w, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, w, bias).chunk(3, dim=-1)
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        # (T, B, E) -> (B, H, T, hd)
        q = q.reshape(tq, b, h, hd).permute(1, 2, 0, 3)
        k = k.reshape(tk, b, h, hd).permute(1, 2, 0, 3)
        v = v.reshape(tk, b, h, hd).permute(1, 2, 0, 3)

        mask, causal = self._merged_mask(key_padding_mask, attn_mask, is_causal, b, tq, tk, q.dtype)
        dropout = self.dropout if self.training else 0.0
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(tq, b, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def _merged_mask(self, key_padding_mask, attn_mask, is_causal, b, tq, tk, dtype):
        """One additive mask broadcastable to (B, H, L, S), or is_causal for the kernels."""
        if is_causal and key_padding_mask is None and attn_mask.shape[-2:] == (tq, tk):
            # Trust the hint, as torch does: the kernels then skip the masked blocks outright.
            return None, True
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and attn_mask.shape == (tq, tk):
                mask = _as_bias(attn_mask, dtype, "attn_mask").view(1, 1, tq, tk)
            elif attn_mask.dim() == 3 and attn_mask.shape == (b * self.num_heads, tq, tk):
                mask = _as_bias(attn_mask, dtype, "attn_mask").view(b, self.num_heads, tq, tk)
            else:
                raise ValueError(
                    f"MultiheadAttention: attn_mask must have shape ({tq}, {tk}) or "
                    f"({b * self.num_heads}, {tq}, {tk}), got {tuple(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, tk):
                raise ValueError(
                    f"MultiheadAttention: key_padding_mask must have shape ({b}, {tk}), "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            kpm = _as_bias(key_padding_mask, dtype, "key_padding_mask").view(b, 1, 1, tk)
            mask = kpm if mask is None else mask + kpm
        return mask, False
