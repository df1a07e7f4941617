"""Rotary position embedding (RoPE) of queries and keys, in one pass over each.

    q_rot, k_rot = rotary_embedding(q, k, cos, sin, *, interleaved=False, backend=None)
    q_rot, k_rot = rotary_embedding(q, k, position_ids=pos, theta=10000.0, rotary_dim=None, ...)

q (B, Hq, T, D) and k (B, Hk, T, D) (grouped-query attention: Hk may be fewer), any strides with a
unit one on the head dim, so q and k can be views of a fused QKV projection. cos and sin are the
tables transformers builds: (B, T, R), or anything that broadcasts to it ((T, R), (1, T, R), or
(B, 1, T, R) with the head dim unsqueezed); R < D rotates only the first R channels of each head
(partial rotary) and passes the rest through. The pairs rotated together are (i, i + R/2), the
rotate-half layout of transformers and Llama, or with `interleaved` (2i, 2i + 1), GPT-J's and the
original RoFormer's:

    a' = a cos_a - b sin_a,    b' = b cos_b + a sin_b

which is `x * cos + rotate_half(x) * sin` for the usual tables (whose two halves repeat).

The second form takes no tables: position_ids ((T,), (1, T) or (B, T), integers) and the base
theta give pair i the angle position * theta^(-2i / R), computed inside the kernel in float64; R is
rotary_dim (default D). It is the thin model's path, and decode's (positions offset by the cache
length).

The fastlm backends run two kernel ops, torch.ops.fastlm.rotary_fwd and rotary_pos_fwd, each one
pass over q and k in float32 arithmetic (float64 for float64). The gradient is the transpose of the
rotation (the rotation by the negative angle for the usual tables), the same kernel with its
`backward` flag; gradients of cos and sin, when they require one, are taken with torch ops. The
"torch" backend is transformers' formula in the inputs' dtype, the reference for speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import backends
from fastlm.ops import _checks
from fastlm.ops._dispatch import kernel_op

# --- the kernels -------------------------------------------------------------------------------


@kernel_op("rotary")
def rotary_fwd(lib, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, backward: bool
               ) -> tuple[Tensor, Tensor]:
    """q and k rotated by the (Bc, T, R) tables; see csrc/fastlm.h for the full contract."""
    return lib.rotary_fwd(q, k, cos, sin, interleaved, backward)


@kernel_op("rotary")
def rotary_pos_fwd(lib, q: Tensor, k: Tensor, positions: Tensor, theta: float, rotary_dim: int,
                   interleaved: bool, backward: bool) -> tuple[Tensor, Tensor]:
    """q and k rotated by angles made from positions (Bp, T) int64 and theta."""
    return lib.rotary_pos_fwd(q, k, positions, theta, rotary_dim, interleaved, backward)


def _fake(q, k, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape)


rotary_fwd.register_fake(_fake)
rotary_pos_fwd.register_fake(_fake)


def _wide(x: Tensor) -> Tensor:
    """x in float32 at least (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pair_swap(x: Tensor, r: int, interleaved: bool) -> Tensor:
    """(-b, a) in each pair's place: rotate_half of the first r channels."""
    x = _wide(x[..., :r])
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((-b, a), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _table_grads(ctx, dq: Tensor, dk: Tensor, q: Tensor, k: Tensor, cos: Tensor) -> tuple[Tensor, Tensor]:
    """d cos and d sin, summed over heads (and over batch for a batch-1 table).
    forward:  y = x cos + swap(x) sin   so  dcos = sum dy x, dsin = sum dy swap(x)
    backward: y = x cos - swap(x sin)   so  dcos = sum dy x, dsin = sum x swap(dy)"""
    r = cos.shape[-1]
    dcos = dsin = None
    for dy, x in ((dq, q), (dk, k)):
        dyr, xr = _wide(dy[..., :r]), _wide(x[..., :r])
        c = (dyr * xr).sum(1)
        s = ((xr * _pair_swap(dy, r, ctx.interleaved)) if ctx.backward else
             (dyr * _pair_swap(x, r, ctx.interleaved))).sum(1)
        dcos, dsin = (c, s) if dcos is None else (dcos + c, dsin + s)
    if cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(cos.dtype)


def _grads_in(dq: Tensor | None, dk: Tensor | None, ctx) -> tuple[Tensor, Tensor]:
    """Gradients in a layout the kernels read (a unit last stride); zeros for an unused output."""
    dq = ctx.q_zeros() if dq is None else dq
    dk = ctx.k_zeros() if dk is None else dk
    return tuple(g if g.shape[-1] <= 1 or g.stride(-1) == 1 else g.contiguous() for g in (dq, dk))


def _keep_shapes(ctx, q: Tensor, k: Tensor) -> None:
    qs, ks, dt, dev = q.shape, k.shape, q.dtype, q.device
    ctx.q_zeros = lambda: torch.zeros(qs, dtype=dt, device=dev)
    ctx.k_zeros = lambda: torch.zeros(ks, dtype=dt, device=dev)


def _table_setup(ctx, inputs, output):
    q, k, cos, sin, interleaved, backward = inputs
    ctx.interleaved, ctx.backward = interleaved, backward
    ctx.table_grads = cos.requires_grad or sin.requires_grad
    # q and k are kept only for the rare gradient of the tables themselves.
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grads else ()))
    _keep_shapes(ctx, q, k)


def _table_backward(ctx, dq_out, dk_out):
    cos, sin, *qk = ctx.saved_tensors
    dq_out, dk_out = _grads_in(dq_out, dk_out, ctx)
    # The op itself, not op.via(ctx): the rotation is linear, so its gradient is differentiable
    # again (double backward) by the same route.
    dq, dk = rotary_fwd(dq_out, dk_out, cos, sin, ctx.interleaved, not ctx.backward, backend=ctx.backend)
    dcos = dsin = None
    if ctx.table_grads:
        dcos, dsin = _table_grads(ctx, dq_out, dk_out, *qk, cos)
    return dq, dk, dcos, dsin, None, None


def _pos_setup(ctx, inputs, output):
    q, k, positions, theta, rotary_dim, interleaved, backward = inputs
    ctx.save_for_backward(positions)
    ctx.args = (theta, rotary_dim, interleaved, not backward)
    _keep_shapes(ctx, q, k)


def _pos_backward(ctx, dq_out, dk_out):
    (positions,) = ctx.saved_tensors
    dq, dk = rotary_pos_fwd(*_grads_in(dq_out, dk_out, ctx), positions, *ctx.args, backend=ctx.backend)
    return dq, dk, None, None, None, None, None


rotary_fwd.register_autograd(_table_setup, _table_backward)
rotary_pos_fwd.register_autograd(_pos_setup, _pos_backward)

# --- the torch path ----------------------------------------------------------------------------


def _torch_rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """transformers' apply_rotary_pos_emb, in x's dtype, for tables (B, 1, T, R)."""
    r = cos.shape[-1]
    xr = x[..., :r]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        swapped = torch.stack((-b, a), dim=-1).flatten(-2)
    else:
        a, b = xr.chunk(2, dim=-1)
        swapped = torch.cat((-b, a), dim=-1)
    out = xr * cos + swapped * sin
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)


def position_tables(positions: Tensor, theta: float, rotary_dim: int, interleaved: bool,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) of shape (Bp, T, rotary_dim) for positions (Bp, T), from float64 angles: the
    tables the position form of rotary_embedding applies."""
    i = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device)
    angles = positions.to(torch.float64)[..., None] * theta ** (-i / rotary_dim)
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# --- the public function ----------------------------------------------------------------------


def _check_qk(op: str, q, k) -> None:
    _checks.tensor(op, "q", q)
    _checks.like(op, "k", k, q, "q")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q and k must be 4-D (batch, heads, time, head_dim), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k must have one head dim, got {q.shape[3]} and {k.shape[3]}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and time")


def _table(op: str, name: str, t, q: Tensor) -> Tensor:
    """cos or sin as (Bc, T, R), Bc 1 or B, from any shape transformers passes."""
    _checks.like(op, name, t, q, "q", same_dtype=False)
    b, _, tq, d = q.shape
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != tq:
        raise ValueError(f"{op}: {name} must have shape (batch or 1, {tq}, rotary_dim) to match q "
                         f"{tuple(q.shape)} (or (T, R), or (B, 1, T, R)), got {tuple(t.shape)}")
    r = t.shape[2]
    if r % 2 or r > d:
        what = "rotate-half" if r == d else "rotary"
        raise ValueError(f"{op}: {name}'s last dim {r} must be even for {what} pairs and at most the head "
                         f"dim {d}")
    return t


def _positions(op: str, position_ids, q: Tensor) -> Tensor:
    _checks.tensor(op, "position_ids", position_ids, floating=False)
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise TypeError(f"{op}: position_ids must be an integer tensor, got dtype {position_ids.dtype}")
    if position_ids.device != q.device:
        raise ValueError(f"{op}: position_ids is on {position_ids.device} but q is on {q.device}")
    b, _, tq, _ = q.shape
    p = position_ids[None] if position_ids.dim() == 1 else position_ids
    if p.dim() != 2 or p.shape[0] not in (1, b) or p.shape[1] != tq:
        raise ValueError(f"{op}: position_ids must have shape ({tq},), (1, {tq}) or ({b}, {tq}) to match q "
                         f"{tuple(q.shape)}, got {tuple(position_ids.shape)}")
    return p


def _unit_last(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def rotary_embedding(
    q: Tensor, k: Tensor, cos: Tensor | None = None, sin: Tensor | None = None, *,
    position_ids: Tensor | None = None, theta: float = 10000.0, rotary_dim: int | None = None,
    interleaved: bool = False, backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(q, k) rotated by cos/sin tables, or by position_ids and theta; see the module docstring."""
    op = "rotary_embedding"
    _check_qk(op, q, k)
    if (cos is None) != (sin is None):
        raise TypeError(f"{op}: cos and sin go together; got only {'cos' if sin is None else 'sin'}")
    if cos is None and position_ids is None:
        raise TypeError(f"{op}: give cos and sin, or position_ids")
    if cos is not None and position_ids is not None:
        raise TypeError(f"{op}: give cos and sin or position_ids, not both")
    chosen = backends.choose(op, q.device, backend)
    if chosen != "torch":
        _checks.backend_dtype(op, chosen, q)
    if cos is not None:
        if rotary_dim is not None:
            raise TypeError(f"{op}: rotary_dim goes with position_ids; with tables it is cos's last dim")
        cos, sin = _table(op, "cos", cos, q), _table(op, "sin", sin, q)
        if cos.shape != sin.shape:
            raise ValueError(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
        if chosen == "torch":
            c4, s4 = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # k has q's dtype (checked)
            return _torch_rotate(q, c4, s4, interleaved), _torch_rotate(k, c4, s4, interleaved)
        angle = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = cos.to(angle).contiguous(), sin.to(angle).contiguous()
        return rotary_fwd(_unit_last(q), _unit_last(k), cos, sin, bool(interleaved), False, backend=chosen)
    positions = _positions(op, position_ids, q)
    _checks.real(op, "theta", theta)
    if not theta > 0:
        raise ValueError(f"{op}: theta must be positive, got {theta}")
    r = q.shape[-1] if rotary_dim is None else rotary_dim
    _checks.integer(op, "rotary_dim", r)
    if r % 2 or not 0 <= r <= q.shape[-1]:
        raise ValueError(f"{op}: rotary_dim {r} must be even and between 0 and the head dim {q.shape[-1]}")
    if chosen == "torch":
        cos, sin = position_tables(positions, float(theta), int(r), interleaved, q.dtype)
        return rotary_embedding(q, k, cos, sin, interleaved=interleaved, backend="torch")
    return rotary_pos_fwd(_unit_last(q), _unit_last(k), positions.to(torch.int64).contiguous(), float(theta),
                          int(r), bool(interleaved), False, backend=chosen)
