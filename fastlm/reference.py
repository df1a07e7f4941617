"""The float64 references every op is measured against, and the rule it is measured by.

Each reference computes in float64 on its inputs' device, from the (rounded) inputs the kernel
saw, and is differentiable: the gradients a test checks are autograd's through it. They are
written as the math, not as calls to the torch functions whose path the "torch" backend runs.
This module imports only torch, so the tests and the benchmarks (fastlm.bench) share it.

The rule (the design's "at most about twice the PyTorch path's error"):

    error(backend) <= max(2 * error(torch, same dtype), floor)

where error is the max abs difference from the float64 reference over the reference's size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(F64)


def _dims(normalized_shape) -> tuple[int, ...]:
    return tuple(range(-len(normalized_shape), 0))


# --- norms ------------------------------------------------------------------------------------


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None) -> tuple[Tensor, Tensor]:
    """(y, h): h = x + residual rounded to x's dtype, as torch adds them; y the norm of h."""
    h = x if residual is None else x + residual
    hd, dims = h.to(F64), _dims(normalized_shape)
    mean = hd.mean(dims, keepdim=True)
    var = (hd - mean).square().mean(dims, keepdim=True)  # biased, as layer norm's
    y = (hd - mean) * torch.rsqrt(var + eps)
    y = y if weight is None else y * _f64(weight)
    return (y if bias is None else y + _f64(bias)), h


def rms_norm(x, normalized_shape, weight=None, eps=None, residual=None) -> tuple[Tensor, Tensor]:
    """(y, h) as layer_norm's; eps None is the machine epsilon of x's dtype, as torch's."""
    h = x if residual is None else x + residual
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    hd = h.to(F64)
    y = hd * torch.rsqrt(hd.square().mean(_dims(normalized_shape), keepdim=True) + eps)
    return (y if weight is None else y * _f64(weight)), h


# --- activation -------------------------------------------------------------------------------


def bias_gelu(x, bias=None, approximate="tanh") -> Tensor:
    """gelu(x + bias); approximate "tanh" or "none" (the erf form)."""
    u = x.to(F64) if bias is None else x.to(F64) + bias.to(F64)
    if approximate == "tanh":
        return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    return 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))


# --- silu_mul ---------------------------------------------------------------------------------


def silu_mul(gate, up) -> Tensor:
    """silu(gate) * up = gate / (1 + e^-gate) * up, the SwiGLU activation."""
    g = gate.to(F64)
    return g / (1 + torch.exp(-g)) * up.to(F64)


# --- attention --------------------------------------------------------------------------------


def attention(q, k, v, mask=None, is_causal=False, scale=None, *, dtype=F64) -> Tensor:
    """softmax(q k^T * scale + mask) v, in `dtype`; q (..., Hq, Tq, D), k and v (..., Hk, Tk, D)
    with Hq a multiple of Hk (grouped queries). A bool mask keeps True; a float one is added (it
    may hold -inf). is_causal keeps key j for query i <= j, aligned to the top left, as torch.
    A fully masked query row gives zeros, as F.scaled_dot_product_attention's fused kernels."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)  # (..., Hq, Tk, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale  # (..., Hq, Tq, Tk)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        s = s + mask.to(dtype)
    if mask is None:  # no row is fully masked (a causal row always sees key 0): softmax as written
        return torch.softmax(s, dim=-1) @ v
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))  # a row of all -inf: all zeros, no NaN
    den = e.sum(-1, keepdim=True)
    return (e / torch.where(den == 0, 1.0, den)) @ v


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None) -> Tensor:
    """The Tn newest queries of each sequence against its cache: query i of sequence b sits at
    position n_b - Tn + i and sees cache positions 0 .. n_b - Tn + i (causal, aligned to the end).
    q (B, Hq, Tn, D); caches (B, Hk, Tmax, D); cache_seqlens (B). Returns (B, Hq, Tn, D)."""
    tn, tmax = q.shape[-2], k_cache.shape[-2]
    pos = cache_seqlens.to(q.device).view(-1, 1, 1, 1) - tn + torch.arange(tn, device=q.device).view(1, 1, tn, 1)
    keep = torch.arange(tmax, device=q.device).view(1, 1, 1, tmax) <= pos  # (B, 1, Tn, Tmax)
    return attention(q, k_cache, v_cache, keep, scale=scale)


# --- embedding --------------------------------------------------------------------------------


def embedding(ids, weight) -> Tensor:
    """weight[ids]: rows of the (V, D) table, (..., D)."""
    return weight.to(F64)[ids.long()]


def embedding_backward(ids, dout, num_embeddings, padding_idx=None) -> Tensor:
    """The (V, D) gradient of the table: dout's rows scatter-added at ids; the padding row none."""
    g = torch.zeros(num_embeddings, dout.shape[-1], dtype=F64, device=dout.device)
    g.index_add_(0, ids.reshape(-1).long().to(dout.device), dout.reshape(-1, dout.shape[-1]).to(F64))
    if padding_idx is not None:
        g[padding_idx] = 0
    return g


def token_position_embedding(ids, tok, pos, start_pos=0) -> Tensor:
    """tok[ids] + pos[start_pos : start_pos + T] for ids (..., T): (..., T, D)."""
    t = ids.shape[-1]
    return embedding(ids, tok) + pos.to(F64)[start_pos:start_pos + t]


# --- quantized linear ---------------------------------------------------------------------------


def quant_linear(x, weight, bias=None) -> Tensor:
    """x W^T + b with W the dequantized (N, K) weight (fastlm.quant.dequantize(qw, torch.float64)):
    the quantization itself is the format's, not the kernel's error."""
    y = x.to(F64) @ weight.to(F64).T  # (..., N)
    return y if bias is None else y + bias.to(F64)


def act_quant(x, block: int = 32) -> Tensor:
    """x (..., K) as the CPU integer path sees it, in float64: per block of `block` along K,
    d = absmax / 127 and q = round(x * (127 / absmax)) (ties to even), both rounded in float32 as
    the kernel computes them; the value is q * d. A block holding a NaN or an infinity is NaN."""
    xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xf.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv).to(F64)
    d = (amax / 127).to(F64)
    out = q * d
    out = torch.where(xf.isfinite().all(-1, keepdim=True), out, torch.full_like(out, float("nan")))
    return out.reshape(x.shape)


# --- cross-entropy ------------------------------------------------------------------------------


def linear_cross_entropy(h, weight, target, ignore_index=-100) -> Tensor:
    """Mean over the kept targets of logsumexp(logits) - logits[target], logits = h W^T (..., V).
    All targets ignored gives NaN (0 / 0), as F.cross_entropy."""
    logits = (h.to(F64) @ weight.to(F64).T).flatten(0, -2)  # (N, V)
    t = target.reshape(-1).long()
    keep = t != ignore_index
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, t.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (N,)
    return (nll * keep).sum() / keep.sum()


# --- rotary position embedding ------------------------------------------------------------------


def rotary(x, cos, sin, interleaved=False) -> Tensor:
    """x (B, H, T, D) rotated pairwise by tables cos, sin broadcastable to (B, 1, T, R), R <= D:
    pair (a, b) = (i, i + R/2), or (2i, 2i + 1) interleaved, becomes (a cos_a - b sin_a,
    b cos_b + a sin_b); channels R.. are kept."""
    x, cos, sin = x.to(F64), cos.to(F64), sin.to(F64)
    r = cos.shape[-1]
    idx = torch.arange(r // 2, device=x.device)
    a, b = (2 * idx, 2 * idx + 1) if interleaved else (idx, idx + r // 2)
    out = x.clone()
    xa, xb = x[..., a], x[..., b]
    out[..., a] = xa * cos[..., a] - xb * sin[..., a]
    out[..., b] = xb * cos[..., b] + xa * sin[..., b]
    return out


def rotary_tables(positions, theta, rotary_dim, interleaved=False) -> tuple[Tensor, Tensor]:
    """(cos, sin) (..., T, R) of angle position * theta^(-2i / R) for pair i, in float64."""
    i = torch.arange(rotary_dim // 2, dtype=F64, device=positions.device)
    ang = positions.to(F64)[..., None] * torch.tensor(float(theta), dtype=F64) ** (-2 * i / rotary_dim)
    ang = ang.repeat_interleave(2, -1) if interleaved else torch.cat((ang, ang), -1)
    return ang.cos(), ang.sin()


# --- the rule ---------------------------------------------------------------------------------


def error(got: Tensor, ref: Tensor, scale: Tensor | float | None = None) -> float:
    """max |got - ref| / scale; scale defaults to max |ref|, the reference's size. A tensor scale
    divides elementwise first (a matmul's error follows each element's sum of |terms|)."""
    diff = (got.detach().to(ref.device, F64) - ref.detach()).abs()
    if scale is None:
        scale = ref.detach().abs().max() if ref.numel() else 1.0
    if isinstance(scale, Tensor):
        scale = scale.detach().to(F64).clamp_min(1e-30)  # an all-zero reference: any error is huge, not NaN
    return (diff / scale).max().item() if diff.numel() else 0.0


def assert_within_twice_torch(got: Tensor, torch_got: Tensor, ref: Tensor, *, floor: float, name: str,
                              scale: Tensor | float | None = None) -> None:
    """The backend's error against the float64 reference is at most twice torch's own in the same
    dtype, or `floor` (a few roundings of the result, where torch's error is near zero).

    Of the forms the tests once wrote separately, the strictest that they all pass: max(2 t, floor)
    rather than 2 t + floor (norm, activation, quantized linear, the model) or 4 t + floor
    (cross-entropy), and the reference's own size as the scale. Attention alone passes a scale of
    at least 1: with inputs of unit scale its truth can be exactly zero (dq when each query sees
    one key), where any rounding noise would be an infinite ratio. On the CPU backends and under
    the Triton interpreter every case stays within 0.62 of its bound."""
    err, base = error(got, ref, scale), error(torch_got, ref, scale)
    assert err <= max(2 * base, floor), f"{name}: error {err:.3g} vs torch's {base:.3g} (floor {floor:.3g})"
