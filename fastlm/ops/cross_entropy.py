"""Cross-entropy of a linear output layer without the full logits: the language model's loss.

    linear_cross_entropy(input, weight, target, ignore_index=-100, *, chunk_size=None, backend=None)

equals F.cross_entropy(F.linear(input, weight).float(), target, ignore_index=ignore_index) (mean
over the targets that are not ignored) for input (..., D), weight (V, D), target (...).

A language model's logits are the largest tensor of a training step: GPT-2's 50304-word vocabulary
at 16 x 1024 tokens is 3.3 GB in float32, written by the output matmul, read by log-softmax,
written again as its gradient. Here the rows are taken a chunk at a time: a chunk's logits are
formed, reduced to its loss, turned in place into the gradient of that loss (softmax minus the
one-hot target), and multiplied straight into the gradients of input and weight while they are
still in cache. Backward then only scales the two stored gradients by the incoming one. The
matmuls are the same three as the unfused path (logits, d input, d weight), so no work is
recomputed; what goes is the (N, V) tensor and the passes over it.

The gradients are computed in the forward pass whenever grad mode is on and input or weight
requires grad, which suits training (the loss is always differentiated) and wastes two matmuls
when it is not; under torch.no_grad only the loss is computed.

The chunked path is built from torch ops (matmuls dominate it; a chunk's softmax is a few passes
over data in cache), so it runs on every device; the "torch" backend is the unfused reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks

# Bytes of float32 logits per chunk: within the last-level cache of a CPU; on a GPU large enough
# that the chunk's matmuls fill the device. Never fewer rows than _MIN_ROWS: every chunk reads the
# whole weight twice and its gradient once, which only enough rows amortise.
_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
_MIN_ROWS = 256


def _chunk_rows(device: torch.device, vocab: int) -> int:
    return max(_MIN_ROWS, _CHUNK_BYTES.get(device.type, 64 << 20) // (4 * vocab))


def _chunked(h: Tensor, w: Tensor, target: Tensor, ignore_index: int, chunk: int, need_dh: bool,
             need_dw: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """(mean loss, d(sum of losses)/dh or None, the same for w or None, count of valid targets)."""
    n = h.shape[0]
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    wc = w.to(h.dtype)  # a weight in another dtype is cast to the input's, as in every fastlm op
    valid = target != ignore_index
    count = valid.sum()
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_dw else None
    total = torch.zeros((), dtype=acc, device=h.device)
    # Accumulate into the weight gradient in place where the dtypes allow (no (V, D) temporary
    # per chunk); in low precision, and under autocast, the chunk's product comes back rounded.
    in_place = h.dtype == acc and not torch.is_autocast_enabled(h.device.type)
    for s in range(0, n, chunk):
        hc, tc, vc = h[s:s + chunk], target[s:s + chunk], valid[s:s + chunk]
        logits = (hc @ wc.t()).to(acc)
        lse = torch.logsumexp(logits, dim=1)
        safe = torch.where(vc, tc, 0)
        picked = logits.gather(1, safe[:, None])[:, 0]
        total += torch.where(vc, lse - picked, 0.0).sum()
        if not (need_dh or need_dw):
            continue
        # d(sum of row losses)/d logits = softmax - onehot(target), zero on ignored rows.
        g = logits.sub_(lse[:, None]).exp_()
        g.scatter_add_(1, safe[:, None], -vc[:, None].to(g.dtype))
        g.mul_(vc[:, None])
        g = g.to(h.dtype)
        if dh is not None:
            dh[s:s + chunk] = g @ wc
        if dw is not None:
            if in_place:
                dw.addmm_(g.t(), hc)
            else:
                dw += g.t() @ hc
    return total / count, dh, dw, count  # 0 / 0 = nan when every target is ignored, as F.cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, target: Tensor, ignore_index: int, chunk: int) -> Tensor:
        loss, dh, dw, count = _chunked(h, w, target, ignore_index, chunk, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])
        ctx.save_for_backward(dh if dh is not None else h.new_empty(0),
                              dw if dw is not None else w.new_empty(0), count)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss: Tensor):
        dh, dw, count = ctx.saved_tensors
        scale = dloss / count
        gh = (dh * scale.to(dh.dtype)) if ctx.needs_input_grad[0] else None
        gw = (dw * scale).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def _check(op: str, input, weight, target, ignore_index: int) -> None:
    _checks.tensor(op, "input", input)
    _checks.tensor(op, "weight", weight)
    if not isinstance(target, Tensor):
        raise TypeError(f"{op}: target must be a torch.Tensor, got {type(target).__name__}")
    _checks.integer(op, "ignore_index", ignore_index)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (vocab, dim), got shape {tuple(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: input's last dim must be weight's dim {weight.shape[1]}, "
                         f"got input of shape {tuple(input.shape)}")
    if target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: target must be int32 or int64, got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{op}: target of shape {tuple(target.shape)} must match input's leading "
                         f"dims {tuple(input.shape[:-1])}")
    for name, t in (("weight", weight), ("target", target)):
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    if not torch.compiler.is_compiling() and target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= weight.shape[0]))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise IndexError(f"{op}: target {value} is out of range for a vocabulary of {weight.shape[0]} "
                             f"(and is not ignore_index {ignore_index})")


def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100, *,
                         chunk_size: int | None = None, backend: str | None = None) -> Tensor:
    """Mean cross-entropy of softmax(input @ weight.T) against target, over targets that are not
    ignore_index, computed in float32. chunk_size: rows per chunk (default: a few MiB of logits
    on a CPU, a few hundred MiB on a GPU)."""
    op = "linear_cross_entropy"
    _check(op, input, weight, target, ignore_index)
    if chunk_size is not None:
        _checks.integer(op, "chunk_size", chunk_size)
        if chunk_size <= 0:
            raise ValueError(f"{op}: chunk_size must be positive, got {chunk_size}")
        chunk_size = int(chunk_size)
    backend = backends.choose(op, input.device, backend)
    h, t = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    if backend == "torch":
        return F.cross_entropy(F.linear(h, weight).float(), t.long(), ignore_index=ignore_index)
    chunk = chunk_size or _chunk_rows(input.device, weight.shape[0])
    if not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad)):
        # Evaluation: the same chunks, no gradient formed. (The autograd.Function cannot tell:
        # it sees requires_grad, and grad mode always reads off inside its forward.)
        return _chunked(h.contiguous(), weight, t, ignore_index, chunk, False, False)[0]
    return _LinearCrossEntropy.apply(h.contiguous(), weight, t, ignore_index, chunk)
