"""A transformers Llama / Mistral / Qwen2 / Qwen3 decoding on the CPU with every decoder layer in one kernel call.

After `fastlm.patch(model)` and `fastlm.quantize_(model, ..., act_quant=True)`, a decode step of
generate() (one new token per sequence, transformers' default DynamicCache) runs the whole stack of
decoder layers as torch.ops.fastlm_C.decode_blocks, the call fastlm's own Transformer decodes with
(csrc/cpu/decode_block.cpp): the same integer-dot matmuls, norms, rotary and decode attention the
patched layers run, with the model's own rotary table, without the ~20 module calls a layer makes
from Python. At decode each kernel takes tens of microseconds, and that Python, run cold after
every weight stream, cost as much as the kernels (a 0.65 B Llama on an Intel Xeon: ~half of a step).

The base model's forward (LlamaModel) is shadowed on the instance, as patch shadows the layers',
and every call that is not such a step, or that this path does not cover, goes to transformers'
forward unchanged. Covered: Llama / Mistral / Qwen2 / Qwen3 decoder layers with all seven
projections act_quant QuantLinears (float32 biases or none), float32 RMSNorms (Qwen3's per-head q
and k norms too), SiLU, any head_dim, any rotary scaling (the model's rotary module makes the
table), no hooks, inference (no grad, eval), no padding in the attention mask but at the front of
a row (a left-padded batch: attention skips each row's padding, rotary takes each row's position),
and every cache layer a plain DynamicLayer (not a sliding window) holding float32 keys of the same
length.

The cache stays transformers' own: each layer's keys and values become views of a longer buffer,
which the kernel writes the new position into, so nothing is concatenated per step; the buffer
doubles when full. Anything that replaces those tensors (a transformers step, crop, beam reorder)
is noticed by identity, and the next fused step copies them into a fresh buffer.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from fastlm import backends
from fastlm.nn import QuantLinear

_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
_PROJ = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
         ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))

# False: every step runs transformers' forward (the per-layer patched modules), as a yardstick.
ENABLED = True

# cache layer -> (k buffer, v buffer, seqlens (B,) int32, the keys view, the values view)
_BUFFERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hooked(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


class _Layer(NamedTuple):
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps: float
    linears: list  # q, k, v, o, gate, up, down
    scaling: float
    q_norm: torch.Tensor | None  # Qwen3's per-head norms of q and k
    k_norm: torch.Tensor | None


def _norm_weight(m, eps: float | None = None) -> torch.Tensor | None:
    """The float32 weight of a Llama-style RMSNorm with no hooks (and this eps, when given)."""
    w = None if m is None else m._parameters.get("weight")
    e = getattr(m, "variance_epsilon", None)
    if w is None or w.dtype != torch.float32 or e is None or (eps is not None and e != eps) or _hooked(m):
        return None
    return w


def _layer_parts(layer) -> _Layer | None:
    """The parts of a covered decoder layer that decode_blocks takes, else None."""
    mods = layer._modules
    attn, mlp = mods.get("self_attn"), mods.get("mlp")
    n1, n2 = mods.get("input_layernorm"), mods.get("post_attention_layernorm")
    if type(layer).__name__ not in _LAYERS or attn is None or mlp is None or n1 is None or n2 is None \
            or any(_hooked(m) for m in (layer, attn, mlp)):
        return None
    linears = [(attn if owner == "self_attn" else mlp)._modules.get(name) for owner, name in _PROJ]
    if not all(type(lin) is QuantLinear and lin.act_quant and lin.in_features % 32 == 0 and not _hooked(lin)
               and (lin._parameters.get("bias") is None or lin._parameters["bias"].dtype == torch.float32)
               for lin in linears):
        return None
    if type(mlp._modules.get("act_fn")).__name__ not in ("SiLUActivation", "SiLU"):
        return None
    w1 = _norm_weight(n1)
    eps = None if w1 is None else n1.variance_epsilon
    w2 = None if w1 is None else _norm_weight(n2, eps)
    qn, kn = attn._modules.get("q_norm"), attn._modules.get("k_norm")
    q_norm, k_norm = _norm_weight(qn, eps), _norm_weight(kn, eps)
    if w2 is None or (qn is None) != (q_norm is None) or (kn is None) != (k_norm is None) \
            or (q_norm is None) != (k_norm is None):
        return None
    return _Layer(w1, w2, float(eps), linears, float(attn.scaling), q_norm, k_norm)


def _kv(layer, batch: int, length: int) -> tuple:
    """The buffers of a DynamicLayer holding `length` positions, with room for one more."""
    keys, values = layer.keys, layer.values
    entry = _BUFFERS.get(layer)
    if entry is not None and entry[3] is keys and entry[4] is values and entry[0].shape[2] > length:
        return entry
    cap = max(2 * length, length + 64)
    kb = keys.new_empty(keys.shape[0], keys.shape[1], cap, keys.shape[3])
    vb = torch.empty_like(kb)
    kb[:, :, :length] = keys
    vb[:, :, :length] = values
    entry = (kb, vb, torch.full((batch,), length, dtype=torch.int32), kb[:, :, :length], vb[:, :, :length])
    _BUFFERS[layer] = entry
    return entry


def _padding(mask, batch: int, length: int) -> torch.Tensor | None:
    """Each sequence's count of leading padding positions (B,) int32, when mask is left padding
    only (row b: zeros, then ones through the new token); None otherwise."""
    if mask.shape != (batch, length + 1):
        return None
    keep = mask.bool()
    pads = (~keep).sum(1)
    if not torch.equal(keep, torch.arange(length + 1) >= pads[:, None]):
        return None
    return pads.to(torch.int32)


def _step(base, args: tuple, kwargs: dict) -> tuple | None:
    """(ids, cache, the cache's keyword, its length, leading padding (B) int32 or None) when the call
    is one new token per sequence in inference, after a prompt in a DynamicCache of plain float32
    layers, with no padding but at the front of a row."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not ENABLED or torch.is_grad_enabled() or base.training or len(args) > 1 or torch.compiler.is_compiling():
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    cache_name = "cache" if "cache" in kwargs else "past_key_values"
    cache = kwargs.get(cache_name)
    if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] != 1 or not ids.is_cpu
            or kwargs.get("inputs_embeds") is not None or type(cache) is not DynamicCache
            or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False or kwargs.get("output_attentions")
            or kwargs.get("output_hidden_states") or base.config.output_hidden_states
            or base.config.output_attentions or _hooked(base)
            or backends.choose("decode_blocks", ids.device) != "cpu"):
        return None
    if len(cache.layers) != base.config.num_hidden_layers or not all(
            type(c) is DynamicLayer and getattr(c, "is_initialized", True) and getattr(c, "keys", None) is not None
            and c.keys.dim() == 4 and c.keys.dtype == torch.float32 and c.keys.is_cpu for c in cache.layers):
        return None
    batch, length = ids.shape[0], cache.layers[0].keys.shape[2]
    if length == 0 or any(c.keys.shape[2] != length or c.keys.shape[0] != batch for c in cache.layers):
        return None
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    pads = None if mask is None else _padding(mask, batch, length)
    if mask is not None and pads is None:
        return None
    if pads is not None and not bool(pads.any()):
        pads = None
    # Each row's position: after its own tokens (transformers counts them from the mask).
    want = torch.full((batch, 1), length) if pads is None else (length - pads.long())[:, None]
    if pos is not None and (pos.numel() not in (1, batch) or not torch.equal(pos.reshape(-1, 1).expand_as(want), want)):
        return None
    return ids, cache, cache_name, length, pads, want if pads is not None else want[:1]


def _stack(base) -> tuple | None:
    """(every layer's parts, heads, key/value heads, head_dim) of a stack decode_blocks runs."""
    cfg = base.config
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    parts = []
    for layer in base._modules["layers"][: cfg.num_hidden_layers]:  # the first not covered ends it
        p = _layer_parts(layer)
        if p is None or (parts and (p.eps, p.scaling, p.q_norm is None)
                         != (parts[0].eps, parts[0].scaling, parts[0].q_norm is None)):
            return None
        parts.append(p)
    if _hooked(base._modules["rotary_emb"]):
        return None
    return parts, n_head, n_kv, head_dim


def decode_step(base, args: tuple, kwargs: dict):
    """The base model's output for this call through one decode_blocks call, or None when the call
    is not a decode step this path covers (the caller then runs transformers' forward)."""
    step = _step(base, args, kwargs)
    stack = None if step is None else _stack(base)
    if stack is None:
        return None
    ids, cache, cache_name, length, pads, positions = step
    parts, n_head, n_kv, head_dim = stack
    x = base.embed_tokens(ids)
    if x.dtype != torch.float32:
        return None
    # The model's own rotary table for the position, whatever its scaling (as its layers get it).
    cos, sin = base.rotary_emb(x, positions)
    kv = [_kv(c, ids.shape[0], length) for c in cache.layers]
    linears = [lin for p in parts for lin in p.linears]
    bufs = [lin._buffers for lin in linears]
    qk = parts[0].q_norm is not None
    out, h = torch.ops.fastlm_C.decode_blocks(
        x.contiguous(), None, [p.norm1 for p in parts], [p.norm2 for p in parts], parts[0].eps,
        [d["qweight"] for d in bufs], [d["scales"] for d in bufs], [d["zeros"] for d in bufs],
        [lin._parameters.get("bias") for lin in linears], [lin.bits for lin in linears],
        [lin.group_size for lin in linears], [e[0] for e in kv], [e[1] for e in kv], [e[2] for e in kv], length,
        n_head, n_kv, 1.0, parts[0].scaling, [p.q_norm for p in parts] if qk else [],
        [p.k_norm for p in parts] if qk else [], head_dim, cos.contiguous(), sin.contiguous(), pads)
    for c, (kb, vb, lens, _, _) in zip(cache.layers, kv):
        c.keys, c.values = kb[:, :, :length + 1], vb[:, :, :length + 1]
        _BUFFERS[c] = (kb, vb, lens, c.keys, c.values)
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(**{"last_hidden_state": base.norm(out + h), cache_name: cache})


def base_forward(self, *args, **kwargs):
    """The forward patch puts on a covered base model: decode_step where it applies."""
    out = decode_step(self, args, kwargs)
    return out if out is not None else type(self).forward(self, *args, **kwargs)
