"""Embedding lookup, alone or fused with the position embedding of a GPT input layer.

    embedding(input, weight, padding_idx=None, *, backend=None)
    token_position_embedding(ids, token_weight, position_weight, start_pos=0, *, backend=None)

`embedding` mirrors torch.nn.functional.embedding (dense gradient; the padding_idx row gets
none). `token_position_embedding` returns token_weight[ids] + position_weight[start_pos + t] for
ids of shape (..., T), reading each row once and writing the sum once.

Ids outside the table raise IndexError naming the value on every backend; a kernel never reads
or writes outside the table. The backward pass adds gradient rows into the table's gradient:
with atomics where that is fastest, and in a fixed order when
torch.are_deterministic_algorithms_enabled(), so that the gradient is bitwise reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._dispatch import kernel_op

# --- the kernels -------------------------------------------------------------------------------


# padding_idx (-1: none) and deterministic only shape the backward; they are arguments of the
# forward so that its autograd formula has them.
@kernel_op("embedding")
def embedding_fwd(lib, ids: Tensor, weight: Tensor, padding_idx: int, deterministic: bool) -> Tensor:
    """weight[ids] for 1-D ids: (len(ids), D)."""
    return lib.embedding_fwd(ids, weight)


@embedding_fwd.register_fake
def _(ids, weight, padding_idx, deterministic):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


@kernel_op("embedding")
def tok_pos_embedding_fwd(lib, ids: Tensor, tok: Tensor, pos: Tensor, start_pos: int, deterministic: bool) -> Tensor:
    """tok[ids] + pos[start_pos:start_pos + T] for ids (B, T): (B, T, D)."""
    return lib.tok_pos_embedding_fwd(ids, tok, pos, start_pos)


@tok_pos_embedding_fwd.register_fake
def _(ids, tok, pos, start_pos, deterministic):
    return tok.new_empty((ids.shape[0], ids.shape[1], tok.shape[1]))


@kernel_op("embedding")
def embedding_bwd(lib, dout: Tensor, ids: Tensor, num_weights: int, padding_idx: int, deterministic: bool) -> Tensor:
    """The table's gradient (num_weights, D): rows of dout added at their ids."""
    return lib.embedding_bwd(dout, ids, num_weights, padding_idx, deterministic)


@embedding_bwd.register_fake
def _(dout, ids, num_weights, padding_idx, deterministic):
    return dout.new_empty((num_weights, dout.shape[1]))


def _embedding_setup(ctx, inputs, output):
    ids, weight, padding_idx, deterministic = inputs
    ctx.save_for_backward(ids)
    ctx.args = (weight.shape[0], padding_idx, deterministic)


def _embedding_backward(ctx, dout):
    (ids,) = ctx.saved_tensors
    dw = embedding_bwd.via(ctx)(dout.contiguous(), ids, *ctx.args)
    return None, dw, None, None


embedding_fwd.register_autograd(_embedding_setup, _embedding_backward)


def _tok_pos_setup(ctx, inputs, output):
    ids, tok, pos, start_pos, deterministic = inputs
    ctx.save_for_backward(ids)
    ctx.vocab, ctx.positions, ctx.start_pos, ctx.deterministic = tok.shape[0], pos.shape[0], start_pos, deterministic


def _tok_pos_backward(ctx, dout):
    (ids,) = ctx.saved_tensors
    b, t, d = dout.shape
    dout = dout.contiguous()
    dtok = embedding_bwd.via(ctx)(dout.view(b * t, d), ids.reshape(-1), ctx.vocab, -1, ctx.deterministic)
    # Each position row sums over the batch: a plain reduction, which torch does at full speed.
    dpos = dout.new_zeros((ctx.positions, d))
    acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
    dpos[ctx.start_pos:ctx.start_pos + t] = dout.sum(0, dtype=acc).to(dout.dtype)
    return None, dtok, dpos, None, None


tok_pos_embedding_fwd.register_autograd(_tok_pos_setup, _tok_pos_backward)

# --- the public functions ---------------------------------------------------------------------


def _check_ids(op: str, ids) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{op}: input must be a torch.Tensor of ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: input must hold int32 or int64 ids, got dtype {ids.dtype}")


def _check_table(op: str, name: str, weight, ids: Tensor) -> None:
    _checks.tensor(op, name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}")
    if weight.device != ids.device:
        raise ValueError(f"{op}: {name} is on {weight.device} but the ids are on {ids.device}")


def _check_range(op: str, ids: Tensor, rows: int) -> None:
    """IndexError naming an offending id. Kernels check on their own; this serves the torch path.
    A compiled graph cannot branch on data, so there torch's own check (no value named) stands."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (ids < 0) | (ids >= rows)
    if bool(bad.any()):
        value = int(ids[bad].reshape(-1)[0])
        raise IndexError(f"{op}: id {value} is out of range for an embedding table of {rows} rows")


def _padding_idx(padding_idx, rows: int) -> int | None:
    if padding_idx is None:
        return None
    if not isinstance(padding_idx, int) or not -rows <= padding_idx < rows:
        raise ValueError(f"embedding: padding_idx must be an int in [-{rows}, {rows}), got {padding_idx!r}")
    return padding_idx % rows


def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None, *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.embedding (dense gradient), on the chosen backend."""
    _check_ids("embedding", input)
    _check_table("embedding", "weight", weight, input)
    padding_idx = _padding_idx(padding_idx, weight.shape[0])
    backend = backends.choose("embedding", input.device, backend)
    if backend == "torch":
        _check_range("embedding", input, weight.shape[0])
        return F.embedding(input, weight, padding_idx)
    _checks.backend_dtype("embedding", backend, weight)
    ids, table = input.reshape(-1).contiguous(), weight.contiguous()
    out = embedding_fwd(ids, table, -1 if padding_idx is None else padding_idx,
                        torch.are_deterministic_algorithms_enabled(), backend=backend)
    return out.view(*input.shape, weight.shape[1])


def token_position_embedding(
    ids: Tensor, token_weight: Tensor, position_weight: Tensor, start_pos: int = 0, *, backend: str | None = None
) -> Tensor:
    """token_weight[ids] + position_weight[start_pos + t] for ids (..., T): shape (..., T, D)."""
    op = "token_position_embedding"
    _check_ids(op, ids)
    _check_table(op, "token_weight", token_weight, ids)
    _check_table(op, "position_weight", position_weight, ids)
    if ids.dim() == 0:
        raise ValueError(f"{op}: ids must have a time dimension, got a 0-d tensor")
    if position_weight.shape[1] != token_weight.shape[1] or position_weight.dtype != token_weight.dtype:
        raise ValueError(
            f"{op}: position_weight {tuple(position_weight.shape)} {position_weight.dtype} must match "
            f"token_weight {tuple(token_weight.shape)} {token_weight.dtype} in width and dtype"
        )
    t = ids.shape[-1]
    if not isinstance(start_pos, int) or start_pos < 0 or start_pos + t > position_weight.shape[0]:
        raise ValueError(
            f"{op}: start_pos {start_pos!r} + {t} positions must fit the position table's "
            f"{position_weight.shape[0]} rows"
        )
    backend = backends.choose(op, ids.device, backend)
    # No ids (an empty batch or time dim): nothing to look up, and torch gives the empty shape.
    if backend == "torch" or ids.numel() == 0:
        _check_range(op, ids, token_weight.shape[0])
        return F.embedding(ids, token_weight) + position_weight[start_pos:start_pos + t]
    _checks.backend_dtype(op, backend, token_weight)
    ids2 = ids.reshape(-1, t).contiguous()
    tok, pos = token_weight.contiguous(), position_weight.contiguous()
    out = tok_pos_embedding_fwd(ids2, tok, pos, start_pos, torch.are_deterministic_algorithms_enabled(),
                                backend=backend)
    return out.view(*ids.shape, token_weight.shape[1])
