"""Bad inputs, edge values and corrupt files, as an attacker and a careless user would pass them.

Every case expects one of two things: a clear exception whose message names the argument
(Raises), or the same answer as torch (Torch: the op's torch twin run on the same inputs, NaN
where torch's is NaN; meta tensors compare by shape and dtype). The public ops run on every
backend of the `backend` fixture (torch and cpu here, triton under the interpreter); the raw
torch.ops.fastlm_C kernels, where a missed check could read out of bounds and crash, run in one
child process per kernel family, many cases to a child. Then PyTorch's own OpInfo samples of the
ops fastlm mirrors run through fastlm.ops.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _env import INTERPRET

from fastlm import backends, nn, ops, quant
from fastlm import train as ftrain
from fastlm.model import Transformer, TransformerConfig

NAN, INF = float("nan"), float("inf")
CPU_BUILT = backends.why_unavailable("cpu", "cpu") is None


@dataclass
class Raises:
    exc: type[BaseException] | tuple[type[BaseException], ...]
    words: str  # a regex the message must contain: the argument's name


@dataclass
class Torch:
    fn: object  # fn() -> torch's answer


def _same(got, want):
    if isinstance(want, tuple | list):
        assert isinstance(got, tuple | list) and len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)
        return
    if want is None:
        assert got is None
        return
    assert isinstance(got, torch.Tensor), type(got)
    assert got.shape == want.shape and got.dtype == want.dtype and got.device.type == want.device.type
    if want.device.type == "meta":
        return
    tol = dict(rtol=2e-3, atol=2e-3) if want.dtype in (torch.float16, torch.bfloat16) else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.detach().cpu(), want.detach().cpu(), equal_nan=True, **tol)


def check(call, want, backend=None):
    if isinstance(want, Raises):
        with pytest.raises(want.exc) as info:
            call(backend)
        assert re.search(want.words, str(info.value)), f"{info.value!r} does not name {want.words!r}"
    else:
        _same(call(backend), want.fn())


# --- the public ops, on every backend ------------------------------------------------------------

def x32(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 7)).to(dtype)


X, W, B = x32(4, 32), x32(32), x32(32) / 10
EXTREME = torch.tensor([[-INF, -3e38, -1e30, -1.0, 0.0, 1.0, 1e30, 3e38, INF, NAN] * 2]).reshape(2, 10)
MIXED = torch.tensor([[1.0, 2.0, NAN, 4.0], [1.0, INF, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1e4, -1e4, 1e3, 0.0]])

CASES: dict[str, tuple] = {}


def case(name, call, want):
    assert name not in CASES, name
    CASES[name] = (call, want)


def _norm_cases():
    lnorm, rnorm = ops.layer_norm, ops.rms_norm
    for op, ref in (("layer_norm", F.layer_norm), ("rms_norm", F.rms_norm)):
        f = getattr(ops, op)
        case(f"{op}/input list", lambda b, f=f: f(X.tolist(), (32,), backend=b), Raises(TypeError, "input"))
        case(f"{op}/input int", lambda b, f=f: f(X.long(), (32,), backend=b), Raises(TypeError, "input"))
        case(f"{op}/input bool", lambda b, f=f: f(X > 0, (32,), backend=b), Raises(TypeError, "input"))
        case(f"{op}/input numpy", lambda b, f=f: f(X.numpy(), (32,), backend=b), Raises(TypeError, "input"))
        case(f"{op}/shape mismatch", lambda b, f=f: f(X, (16,), backend=b), Raises(ValueError, "normalized_shape"))
        case(f"{op}/shape str", lambda b, f=f: f(X, "32", backend=b), Raises(TypeError, "normalized_shape"))
        case(f"{op}/shape float", lambda b, f=f: f(X, 32.0, backend=b), Raises(TypeError, "normalized_shape"))
        case(f"{op}/shape empty", lambda b, f=f: f(X, (), backend=b), Raises(ValueError, "normalized_shape"))
        case(f"{op}/shape too long", lambda b, f=f: f(X, (2, 4, 32), backend=b),
             Raises(ValueError, "normalized_shape"))
        case(f"{op}/weight short", lambda b, f=f: f(X, (32,), W[:8], backend=b), Raises(ValueError, "weight"))
        case(f"{op}/weight 2-D", lambda b, f=f: f(X, (32,), W[None], backend=b), Raises(ValueError, "weight"))
        case(f"{op}/weight int", lambda b, f=f: f(X, (32,), W.long(), backend=b), Raises(TypeError, "weight"))
        case(f"{op}/weight meta", lambda b, f=f: f(X, (32,), W.to("meta"), backend=b), Raises(ValueError, "weight"))
        case(f"{op}/weight list", lambda b, f=f: f(X, (32,), W.tolist(), backend=b), Raises(TypeError, "weight"))
        case(f"{op}/eps str", lambda b, f=f: f(X, (32,), eps="1e-5", backend=b), Raises(TypeError, "eps"))
        case(f"{op}/eps list", lambda b, f=f: f(X, (32,), eps=[1e-5], backend=b), Raises(TypeError, "eps"))
        case(f"{op}/eps tensor", lambda b, f=f: f(X, (32,), eps=torch.tensor(1e-5), backend=b),
             Raises(TypeError, "eps"))
        case(f"{op}/unknown backend", lambda b, f=f: f(X, (32,), backend="nope"), Raises(RuntimeError, "backend"))
        case(f"{op}/no rows", lambda b, f=f: f(x32(0, 32), (32,), W, backend=b),
             Torch(lambda ref=ref: ref(x32(0, 32), (32,), W)))
        case(f"{op}/no columns", lambda b, f=f: f(x32(3, 0), (0,), backend=b),
             Torch(lambda ref=ref: ref(x32(3, 0), (0,))))
        case(f"{op}/zero-stride rows", lambda b, f=f: f(X[:1].expand(5, 32), (32,), W, backend=b),
             Torch(lambda ref=ref: ref(X[:1].expand(5, 32), (32,), W)))
        case(f"{op}/transposed", lambda b, f=f: f(x32(32, 6).t(), (32,), W, backend=b),
             Torch(lambda ref=ref: ref(x32(32, 6).t(), (32,), W)))
        case(f"{op}/one column", lambda b, f=f: f(x32(5, 1), (1,), backend=b),
             Torch(lambda ref=ref: ref(x32(5, 1), (1,))))
        case(f"{op}/nan inf rows", lambda b, f=f: f(MIXED, (4,), backend=b), Torch(lambda ref=ref: ref(MIXED, (4,))))
        case(f"{op}/extremes", lambda b, f=f: f(EXTREME, (10,), backend=b), Torch(lambda ref=ref: ref(EXTREME, (10,))))
        case(f"{op}/3-D two dims", lambda b, f=f: f(x32(2, 3, 8), (3, 8), backend=b),
             Torch(lambda ref=ref: ref(x32(2, 3, 8), (3, 8))))
        case(f"{op}/weight float64", lambda b, f=f: f(X, (32,), W.double(), backend=b),
             Torch(lambda ref=ref: ref(X, (32,), W.float())))
    case("layer_norm/bias short", lambda b: lnorm(X, (32,), W, B[:5], backend=b), Raises(ValueError, "bias"))
    case("layer_norm/bias meta", lambda b: lnorm(X, (32,), W, B.to("meta"), backend=b), Raises(ValueError, "bias"))
    case("layer_norm/bias int", lambda b: lnorm(X, (32,), W, B.long(), backend=b), Raises(TypeError, "bias"))
    case("layer_norm/eps None", lambda b: lnorm(X, (32,), eps=None, backend=b), Raises(TypeError, "eps"))
    case("layer_norm/constant rows eps 0", lambda b: lnorm(torch.ones(3, 8), (8,), eps=0.0, backend=b),
         Torch(lambda: F.layer_norm(torch.ones(3, 8), (8,), eps=0.0)))
    case("rms_norm/zero rows eps 0", lambda b: rnorm(torch.zeros(3, 8), (8,), eps=0.0, backend=b),
         Torch(lambda: F.rms_norm(torch.zeros(3, 8), (8,), eps=0.0)))
    case("layer_norm/fp16 large", lambda b: lnorm(x32(4, 64, dtype=torch.float16) * 6e4, (64,), backend=b),
         Torch(lambda: F.layer_norm((x32(4, 64, dtype=torch.float16) * 6e4), (64,))))
    for op in ("add_layer_norm", "add_rms_norm"):
        f = getattr(ops, op)
        single = F.layer_norm if op == "add_layer_norm" else F.rms_norm
        case(f"{op}/residual None", lambda b, f=f: f(X, None, (32,), backend=b), Raises(TypeError, "residual"))
        case(f"{op}/residual short", lambda b, f=f: f(X, X[:2], (32,), backend=b), Raises(ValueError, "residual"))
        case(f"{op}/residual float64", lambda b, f=f: f(X, X.double(), (32,), backend=b),
             Raises(TypeError, "residual"))
        case(f"{op}/residual meta", lambda b, f=f: f(X, X.to("meta"), (32,), backend=b),
             Raises(ValueError, "residual"))
        case(f"{op}/residual list", lambda b, f=f: f(X, X.tolist(), (32,), backend=b), Raises(TypeError, "residual"))
        case(f"{op}/x int", lambda b, f=f: f(X.long(), X, (32,), backend=b), Raises(TypeError, "x"))
        case(f"{op}/eps str", lambda b, f=f: f(X, X, (32,), eps="a", backend=b), Raises(TypeError, "eps"))
        case(f"{op}/no rows", lambda b, f=f: f(x32(0, 32), x32(0, 32), (32,), backend=b),
             Torch(lambda s=single: (s(x32(0, 32), (32,)), x32(0, 32))))
        case(f"{op}/zero-stride residual", lambda b, f=f: f(X, X[:1].expand(4, 32), (32,), backend=b),
             Torch(lambda s=single: (s(X + X[:1], (32,)), X + X[:1])))
        case(f"{op}/nan inf", lambda b, f=f: f(MIXED, MIXED, (4,), backend=b),
             Torch(lambda s=single: (s(MIXED + MIXED, (4,)), MIXED + MIXED)))


def _activation_cases():
    g = ops.bias_gelu
    case("bias_gelu/input list", lambda b: g(X.tolist(), backend=b), Raises(TypeError, "input"))
    case("bias_gelu/input int", lambda b: g(X.long(), backend=b), Raises(TypeError, "input"))
    case("bias_gelu/input 0-d", lambda b: g(torch.tensor(1.0), backend=b), Raises(ValueError, "input"))
    case("bias_gelu/bias short", lambda b: g(X, B[:3], backend=b), Raises(ValueError, "bias"))
    case("bias_gelu/bias int", lambda b: g(X, B.long(), backend=b), Raises(TypeError, "bias"))
    case("bias_gelu/bias meta", lambda b: g(X, B.to("meta"), backend=b), Raises(ValueError, "bias"))
    case("bias_gelu/bias 2-D", lambda b: g(X, B[None], backend=b), Raises(ValueError, "bias"))
    case("bias_gelu/approximate", lambda b: g(X, approximate="fast", backend=b), Raises(ValueError, "approximate"))
    case("bias_gelu/approximate None", lambda b: g(X, approximate=None, backend=b),
         Raises(ValueError, "approximate"))
    for a in ("tanh", "none"):
        case(f"bias_gelu/{a}/no rows", lambda b, a=a: g(x32(0, 8), x32(8), a, backend=b),
             Torch(lambda a=a: F.gelu(x32(0, 8) + x32(8), approximate=a)))
        case(f"bias_gelu/{a}/no columns", lambda b, a=a: g(x32(3, 0), None, a, backend=b),
             Torch(lambda a=a: F.gelu(x32(3, 0), approximate=a)))
        case(f"bias_gelu/{a}/zero-stride", lambda b, a=a: g(X[:1].expand(6, 32), B, a, backend=b),
             Torch(lambda a=a: F.gelu(X[:1].expand(6, 32) + B, approximate=a)))
        case(f"bias_gelu/{a}/transposed", lambda b, a=a: g(x32(32, 5).t(), None, a, backend=b),
             Torch(lambda a=a: F.gelu(x32(32, 5).t(), approximate=a)))
        case(f"bias_gelu/{a}/3-D", lambda b, a=a: g(x32(2, 3, 32), B, a, backend=b),
             Torch(lambda a=a: F.gelu(x32(2, 3, 32) + B, approximate=a)))
        case(f"bias_gelu/{a}/finite extremes", lambda b, a=a: g(EXTREME[:, 1:8], None, a, backend=b),
             Torch(lambda a=a: F.gelu(EXTREME[:, 1:8].double(), approximate=a).float()))
        case(f"bias_gelu/{a}/fp16 range", lambda b, a=a: g(torch.tensor([[-6e4, -20.0, 0.0, 20.0, 6e4]]).half(),
                                                            None, a, backend=b),
             Torch(lambda a=a: F.gelu(torch.tensor([[-6e4, -20.0, 0.0, 20.0, 6e4]]).half(), approximate=a)))
    case("bias_gelu/tanh/nan -inf", lambda b: g(torch.tensor([[NAN, -INF, INF]]), backend=b),
         Torch(lambda: F.gelu(torch.tensor([[NAN, -INF, INF]]), approximate="tanh")))
    case("linear_gelu/weight list", lambda b: ops.linear_gelu(X, W.tolist(), backend=b), Raises(TypeError, "weight"))
    case("linear_gelu/weight int", lambda b: ops.linear_gelu(X, x32(8, 32).long(), backend=b),
         Raises(TypeError, "weight"))
    _silu_mul_cases()


def _silu_mul_cases():
    s, gu = ops.silu_mul, x32(4, 64)
    case("silu_mul/gate list", lambda b: s(X.tolist(), X, backend=b), Raises(TypeError, "gate"))
    case("silu_mul/gate int", lambda b: s(X.long(), X, backend=b), Raises(TypeError, "gate"))
    case("silu_mul/up int", lambda b: s(X, X.long(), backend=b), Raises(TypeError, "up"))
    case("silu_mul/up None", lambda b: s(X, None, backend=b), Raises(TypeError, "up"))
    case("silu_mul/up dtype", lambda b: s(X, X.double(), backend=b), Raises(TypeError, "up"))
    case("silu_mul/up meta", lambda b: s(X, X.to("meta"), backend=b), Raises(ValueError, "up"))
    case("silu_mul/up short", lambda b: s(X, X[:, :8], backend=b), Raises(ValueError, "up"))
    case("silu_mul/up broadcast", lambda b: s(X, X[:1], backend=b), Raises(ValueError, "up"))
    case("silu_mul/gate 0-d", lambda b: s(torch.tensor(1.0), torch.tensor(1.0), backend=b), Raises(ValueError, "gate"))
    case("silu_mul/no rows", lambda b: s(x32(0, 8), x32(0, 8), backend=b), Torch(lambda: F.silu(x32(0, 8)) * x32(0, 8)))
    case("silu_mul/no columns", lambda b: s(x32(3, 0), x32(3, 0), backend=b),
         Torch(lambda: F.silu(x32(3, 0)) * x32(3, 0)))
    case("silu_mul/chunked halves", lambda b: s(*gu.chunk(2, -1), backend=b),
         Torch(lambda: F.silu(gu[:, :32]) * gu[:, 32:]))
    case("silu_mul/zero-stride", lambda b: s(X[:1].expand(6, 32), X[:1].expand(6, 32), backend=b),
         Torch(lambda: F.silu(X[:1].expand(6, 32)) * X[:1].expand(6, 32)))
    case("silu_mul/transposed", lambda b: s(x32(32, 5).t(), x32(32, 5).t(), backend=b),
         Torch(lambda: F.silu(x32(32, 5).t()) * x32(32, 5).t()))
    case("silu_mul/extremes", lambda b: s(EXTREME, EXTREME, backend=b), Torch(lambda: F.silu(EXTREME) * EXTREME))
    case("silu_mul/fp16 range", lambda b: s(torch.tensor([[-6e4, -20.0, 0.0, 20.0, 6e4]]).half(),
                                             torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.5]]).half(), backend=b),
         Torch(lambda: F.silu(torch.tensor([[-6e4, -20.0, 0.0, 20.0, 6e4]]).half())
               * torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.5]]).half()))


def _embedding_cases():
    e, tp = ops.embedding, ops.token_position_embedding
    tok, pos = x32(10, 8), x32(6, 8)
    ids = torch.tensor([[1, 2, 3], [4, 5, 9]])
    case("embedding/ids float", lambda b: e(ids.float(), tok, backend=b), Raises(TypeError, "input"))
    case("embedding/ids list", lambda b: e(ids.tolist(), tok, backend=b), Raises(TypeError, "input"))
    case("embedding/id too big", lambda b: e(torch.tensor([1, 10]), tok, backend=b), Raises(IndexError, "10"))
    case("embedding/id negative", lambda b: e(torch.tensor([-1, 2]), tok, backend=b), Raises(IndexError, "-1"))
    case("embedding/id int64 max", lambda b: e(torch.tensor([2**62]), tok, backend=b), Raises(IndexError, "id"))
    case("embedding/weight 1-D", lambda b: e(ids, tok[0], backend=b), Raises(ValueError, "weight"))
    case("embedding/weight int", lambda b: e(ids, tok.long(), backend=b), Raises(TypeError, "weight"))
    case("embedding/weight meta", lambda b: e(ids, tok.to("meta"), backend=b), Raises(ValueError, "weight"))
    case("embedding/padding_idx big", lambda b: e(ids, tok, 10, backend=b), Raises(ValueError, "padding_idx"))
    case("embedding/padding_idx float", lambda b: e(ids, tok, 1.0, backend=b), Raises(ValueError, "padding_idx"))
    case("embedding/no ids", lambda b: e(torch.zeros(0, dtype=torch.long), tok, backend=b),
         Torch(lambda: F.embedding(torch.zeros(0, dtype=torch.long), tok)))
    case("embedding/no time", lambda b: e(torch.zeros(2, 0, dtype=torch.long), tok, backend=b),
         Torch(lambda: F.embedding(torch.zeros(2, 0, dtype=torch.long), tok)))
    case("embedding/0-d id", lambda b: e(torch.tensor(3), tok, backend=b),
         Torch(lambda: F.embedding(torch.tensor(3), tok)))
    case("embedding/zero-stride ids", lambda b: e(torch.tensor([4]).expand(5), tok, backend=b),
         Torch(lambda: F.embedding(torch.tensor([4]).expand(5), tok)))
    case("embedding/zero-stride table", lambda b: e(ids, tok[:1].expand(10, 8), backend=b),
         Torch(lambda: F.embedding(ids, tok[:1].expand(10, 8))))
    case("embedding/int32 ids", lambda b: e(ids.int(), tok, backend=b), Torch(lambda: F.embedding(ids, tok)))
    case("embedding/nan row", lambda b: e(ids, torch.where(torch.arange(10)[:, None] == 9, NAN, tok), backend=b),
         Torch(lambda: F.embedding(ids, torch.where(torch.arange(10)[:, None] == 9, NAN, tok))))
    case("tok_pos/start_pos negative", lambda b: tp(ids, tok, pos, -1, backend=b), Raises(ValueError, "start_pos"))
    case("tok_pos/start_pos past end", lambda b: tp(ids, tok, pos, 4, backend=b), Raises(ValueError, "start_pos"))
    case("tok_pos/start_pos float", lambda b: tp(ids, tok, pos, 1.0, backend=b), Raises(ValueError, "start_pos"))
    case("tok_pos/ids 0-d", lambda b: tp(torch.tensor(1), tok, pos, backend=b), Raises(ValueError, "ids"))
    case("tok_pos/ids float", lambda b: tp(ids.float(), tok, pos, backend=b), Raises(TypeError, "input"))
    case("tok_pos/pos width", lambda b: tp(ids, tok, pos[:, :4], backend=b), Raises(ValueError, "position_weight"))
    case("tok_pos/pos dtype", lambda b: tp(ids, tok, pos.double(), backend=b), Raises(ValueError, "position_weight"))
    case("tok_pos/pos meta", lambda b: tp(ids, tok, pos.to("meta"), backend=b), Raises(ValueError, "position_weight"))
    case("tok_pos/id too big", lambda b: tp(torch.tensor([[10]]), tok, pos, backend=b), Raises(IndexError, "10"))
    for shape in ((2, 0), (0, 3), (0, 0)):
        z = torch.zeros(shape, dtype=torch.long)
        case(f"tok_pos/empty {shape}", lambda b, z=z: tp(z, tok, pos, backend=b),
             Torch(lambda z=z: F.embedding(z, tok) + pos[: z.shape[-1]]))
    case("tok_pos/1-D ids", lambda b: tp(torch.tensor([1, 2]), tok, pos, 3, backend=b),
         Torch(lambda: F.embedding(torch.tensor([1, 2]), tok) + pos[3:5]))


def _attention_cases():
    sdpa, dec = ops.scaled_dot_product_attention, ops.decode_attention
    q, k = x32(2, 4, 8, 16), x32(2, 4, 8, 16)
    case("sdpa/query int", lambda b: sdpa(q.long(), k, k, backend=b), Raises(TypeError, "query"))
    case("sdpa/key dtype", lambda b: sdpa(q, k.double(), k, backend=b), Raises(TypeError, "key"))
    case("sdpa/value meta", lambda b: sdpa(q, k, k.to("meta"), backend=b), Raises(ValueError, "value"))
    case("sdpa/key list", lambda b: sdpa(q, k.tolist(), k, backend=b), Raises(TypeError, "key"))
    case("sdpa/head dim", lambda b: sdpa(q, k[..., :8], k[..., :8], backend=b), Raises(ValueError, "head dim"))
    case("sdpa/key value length", lambda b: sdpa(q, k, k[:, :, :5], backend=b), Raises(ValueError, "value"))
    case("sdpa/heads no gqa", lambda b: sdpa(q, k[:, :2], k[:, :2], backend=b), Raises(ValueError, "enable_gqa"))
    case("sdpa/heads not multiple", lambda b: sdpa(q, k[:, :3], k[:, :3], enable_gqa=True, backend=b),
         Raises(ValueError, "multiple"))
    case("sdpa/batch 3 vs 2", lambda b: sdpa(q, torch.cat([k, k[:1]]), torch.cat([k, k[:1]]), backend=b),
         Raises(ValueError, "batch"))
    case("sdpa/1-D", lambda b: sdpa(q[0, 0, 0], k[0, 0, 0], k[0, 0, 0], backend=b), Raises(ValueError, "2 dims"))
    case("sdpa/mask shape", lambda b: sdpa(q, k, k, attn_mask=torch.ones(2, 4, 8, 7, dtype=torch.bool), backend=b),
         Raises(ValueError, "attn_mask"))
    case("sdpa/mask int", lambda b: sdpa(q, k, k, attn_mask=torch.ones(8, 8, dtype=torch.long), backend=b),
         Raises(TypeError, "attn_mask"))
    case("sdpa/mask list", lambda b: sdpa(q, k, k, attn_mask=[[True]], backend=b), Raises(TypeError, "attn_mask"))
    case("sdpa/mask meta", lambda b: sdpa(q, k, k, attn_mask=torch.ones(8, 8, dtype=torch.bool, device="meta"),
                                          backend=b), Raises(ValueError, "attn_mask"))
    case("sdpa/mask and causal", lambda b: sdpa(q, k, k, attn_mask=torch.ones(8, 8, dtype=torch.bool),
                                                is_causal=True, backend=b), Raises(ValueError, "is_causal"))
    case("sdpa/dropout 2", lambda b: sdpa(q, k, k, dropout_p=2.0, backend=b), Raises(ValueError, "dropout_p"))
    case("sdpa/dropout nan", lambda b: sdpa(q, k, k, dropout_p=NAN, backend=b), Raises(ValueError, "dropout_p"))
    case("sdpa/dropout str", lambda b: sdpa(q, k, k, dropout_p="0", backend=b), Raises(TypeError, "dropout_p"))
    case("sdpa/scale str", lambda b: sdpa(q, k, k, scale="1", backend=b), Raises(TypeError, "scale"))
    for name, (qs, ks, kw) in {
        "3-D q vs 4-D kv": ((4, 3, 16), (4, 4, 6, 16), {}), "batch 1 vs 2": ((1, 4, 3, 16), (2, 4, 6, 16), {}),
        "one kv head": ((2, 4, 3, 16), (2, 1, 6, 16), {}),
        "gqa batch 1 vs 2": ((1, 4, 3, 16), (2, 2, 6, 16), dict(enable_gqa=True)),
        "gqa 3-D": ((4, 3, 16), (2, 6, 16), dict(enable_gqa=True)), "2-D q vs 3-D kv": ((3, 16), (2, 6, 16), {}),
        "2-D": ((3, 16), (6, 16), {}), "5-D": ((2, 2, 2, 3, 16), (2, 2, 2, 6, 16), {}),
        "no queries": ((2, 2, 0, 16), (2, 2, 6, 16), {}), "no keys": ((2, 2, 3, 16), (2, 2, 0, 16), {}),
        "head dim 0": ((2, 2, 3, 0), (2, 2, 6, 0), {}), "no batch": ((0, 2, 3, 16), (0, 2, 6, 16), {}),
        "causal Tq > Tk": ((1, 2, 6, 16), (1, 2, 3, 16), dict(is_causal=True)),
        "big scores": ((1, 2, 3, 16), (1, 2, 5, 16), dict(scale=1e3)),
        "scale 0": ((1, 2, 3, 16), (1, 2, 5, 16), dict(scale=0.0)),
    }.items():
        qq, kk, vv = x32(*qs), x32(*ks), x32(*ks) + 1
        case(f"sdpa/{name}", lambda b, qq=qq, kk=kk, vv=vv, kw=kw: sdpa(qq, kk, vv, **kw, backend=b),
             Torch(lambda qq=qq, kk=kk, vv=vv, kw=kw: F.scaled_dot_product_attention(qq, kk, vv, **kw)))
    qe = x32(1, 2, 8, 16).expand(3, 2, 8, 16)
    ke = k[:1].expand(3, 4, 8, 16)[:, :2]
    case("sdpa/zero-stride query", lambda b: sdpa(qe, ke, ke, backend=b),
         Torch(lambda: F.scaled_dot_product_attention(qe, ke, ke)))
    row_off = torch.ones(8, 8, dtype=torch.bool)
    row_off[2] = False
    case("sdpa/fully masked row", lambda b: sdpa(q, k, k, attn_mask=row_off, backend=b),
         Torch(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=row_off)))
    case("sdpa/nan in value", lambda b: sdpa(q, k, torch.where(k > 2, NAN, k), backend=b),
         Torch(lambda: F.scaled_dot_product_attention(q, k, torch.where(k > 2, NAN, k))))
    qd, kc = x32(2, 4, 1, 16), x32(2, 2, 8, 16)
    sl = torch.tensor([5, 3])
    case("decode/q 3-D", lambda b: dec(qd[0], kc, kc, sl, backend=b), Raises(ValueError, "q must be 4-D"))
    case("decode/q int", lambda b: dec(qd.long(), kc, kc, sl, backend=b), Raises(TypeError, "q"))
    case("decode/k_cache batch", lambda b: dec(qd, kc[:1], kc[:1], sl, backend=b), Raises(ValueError, "k_cache"))
    case("decode/v_cache shape", lambda b: dec(qd, kc, kc[:, :, :4], sl, backend=b), Raises(ValueError, "v_cache"))
    case("decode/k_cache dtype", lambda b: dec(qd, kc.half(), kc, sl, backend=b), Raises(TypeError, "k_cache"))
    case("decode/k_cache meta", lambda b: dec(qd, kc.to("meta"), kc, sl, backend=b), Raises(ValueError, "k_cache"))
    case("decode/heads", lambda b: dec(x32(2, 3, 1, 16), kc, kc, sl, backend=b), Raises(ValueError, "multiple"))
    case("decode/head dim 0", lambda b: dec(x32(2, 4, 1, 0), x32(2, 2, 8, 0), x32(2, 2, 8, 0), sl, backend=b),
         Raises(ValueError, "head dim"))
    case("decode/seqlens float", lambda b: dec(qd, kc, kc, sl.float(), backend=b), Raises(TypeError, "cache_seqlens"))
    case("decode/seqlens shape", lambda b: dec(qd, kc, kc, sl[:1], backend=b), Raises(ValueError, "cache_seqlens"))
    case("decode/seqlens past Tmax", lambda b: dec(qd, kc, kc, torch.tensor([9, 3]), backend=b),
         Raises(ValueError, "cache_seqlens"))
    case("decode/seqlens below Tn", lambda b: dec(qd, kc, kc, torch.tensor([0, 3]), backend=b),
         Raises(ValueError, "cache_seqlens"))
    case("decode/seqlen_range wrong", lambda b: dec(qd, kc, kc, sl, seqlen_range=(5, 3), backend=b),
         Raises(ValueError, "seqlen_range"))
    case("decode/scale str", lambda b: dec(qd, kc, kc, sl, scale="x", backend=b), Raises(TypeError, "scale"))
    dirty_k = kc.clone()
    dirty_k[0, :, 5:], dirty_k[1, :, 3:] = NAN, INF
    dirty_v = kc.clone()
    dirty_v[0, :, 5:], dirty_v[1, :, 3:] = INF, NAN

    def _clean_decode():
        out = [F.scaled_dot_product_attention(qd[i:i + 1], kc[i:i + 1, :, :n], kc[i:i + 1, :, :n], enable_gqa=True)
               for i, n in enumerate(sl.tolist())]
        return torch.cat(out)

    case("decode/nan inf past seqlens", lambda b: dec(qd, dirty_k, dirty_v, sl, backend=b), Torch(_clean_decode))
    case("decode/int32 seqlens", lambda b: dec(qd, kc, kc, sl.int(), backend=b), Torch(_clean_decode))


def _quant_cases():
    qz, ql = quant.quantize, ops.quant_linear
    w = x32(8, 64)
    q8 = qz(w, 8)
    case("quantize/bits 3", lambda b: qz(w, bits=3), Raises(ValueError, "bits"))
    case("quantize/bits str", lambda b: qz(w, bits="8"), Raises(ValueError, "bits"))
    case("quantize/group 16", lambda b: qz(w, 4, 16), Raises(ValueError, "group_size"))
    case("quantize/group not dividing", lambda b: qz(x32(4, 96), 4, 64), Raises(ValueError, "group_size"))
    case("quantize/odd K", lambda b: qz(x32(4, 63), 4, 32), Raises(ValueError, "in_features"))
    case("quantize/1-D", lambda b: qz(w[0], 8), Raises(ValueError, "weight"))
    case("quantize/int", lambda b: qz(w.long(), 8), Raises(TypeError, "weight"))
    case("quantize/list", lambda b: qz(w.tolist(), 8), Raises(TypeError, "weight"))
    case("quantize/no columns", lambda b: qz(x32(4, 0), 8), Raises(ValueError, "weight"))
    case("quantize/int8 asymmetric", lambda b: qz(w, 8, symmetric=False), Raises(ValueError, "asymmetric"))
    case("quant_linear/x K", lambda b: ql(x32(3, 32), q8, backend=b), Raises(ValueError, "input|in_features"))
    case("quant_linear/x int", lambda b: ql(x32(3, 64).long(), q8, backend=b), Raises(TypeError, "input"))
    case("quant_linear/weight tensor", lambda b: ql(x32(3, 64), w, backend=b), Raises(TypeError, "weight"))
    case("quant_linear/qweight dtype", lambda b: ql(x32(3, 64), quant.QuantizedWeight(
        q8.qweight.to(torch.uint8), q8.scales, None, 8, 64, (8, 64)), backend=b), Raises(ValueError, "qweight"))
    case("quant_linear/scales shape", lambda b: ql(x32(3, 64), quant.QuantizedWeight(
        q8.qweight, q8.scales[:4], None, 8, 64, (8, 64)), backend=b), Raises(ValueError, "scales"))
    case("quant_linear/bias short", lambda b: ql(x32(3, 64), q8, x32(3), backend=b), Raises(ValueError, "bias"))
    case("quant_linear/no rows", lambda b: ql(x32(0, 64), q8, backend=b),
         Torch(lambda: F.linear(x32(0, 64), quant.dequantize(q8))))
    nan_w = w.clone()
    nan_w[3, 7] = NAN
    for bits, sym in ((8, True), (4, True), (4, False)):
        qn = qz(nan_w, bits, 32, sym)
        xs = X[:, :1].expand(4, 64).contiguous()
        case(f"quant_linear/nan weight int{bits}{'' if sym else ' asym'}",
             lambda b, qn=qn, xs=xs: ql(xs, qn, backend=b).isnan().any(0),
             Torch(lambda: torch.arange(8) == 3))
    ce = ops.linear_cross_entropy
    h, t = x32(5, 8), torch.tensor([1, 2, 3, 4, 0])
    case("cross_entropy/chunk float", lambda b: ce(h, x32(10, 8), t, chunk_size=2.5, backend=b),
         Raises(TypeError, "chunk_size"))
    case("cross_entropy/chunk 0", lambda b: ce(h, x32(10, 8), t, chunk_size=0, backend=b),
         Raises(ValueError, "chunk_size"))
    case("cross_entropy/target float", lambda b: ce(h, x32(10, 8), t.float(), backend=b), Raises(TypeError, "target"))
    case("cross_entropy/target range", lambda b: ce(h, x32(10, 8), t + 9, backend=b), Raises(IndexError, "target"))
    case("cross_entropy/target shape", lambda b: ce(h, x32(10, 8), t[:2], backend=b), Raises(ValueError, "target"))
    case("cross_entropy/weight 1-D", lambda b: ce(h, x32(8), t, backend=b), Raises(ValueError, "weight"))
    case("cross_entropy/weight meta", lambda b: ce(h, x32(10, 8).to("meta"), t, backend=b),
         Raises(ValueError, "weight"))
    case("cross_entropy/ignore_index float", lambda b: ce(h, x32(10, 8), t, ignore_index=0.5, backend=b),
         Raises(TypeError, "ignore_index"))
    case("cross_entropy/all ignored", lambda b: ce(h, x32(10, 8), torch.full((5,), -100), backend=b),
         Torch(lambda: F.cross_entropy(h @ x32(10, 8).t(), torch.full((5,), -100))))
    case("cross_entropy/no rows", lambda b: ce(x32(0, 8), x32(10, 8), t[:0], backend=b),
         Torch(lambda: F.cross_entropy(x32(0, 8) @ x32(10, 8).t(), t[:0])))


def _module_cases():
    ln, rms, emb = nn.LayerNorm(32), nn.RMSNorm(32), nn.Embedding(10, 8)
    case("nn.LayerNorm/wrong width", lambda b: ln(x32(4, 16)), Raises(ValueError, "normalized_shape"))
    case("nn.LayerNorm/residual short", lambda b: ln(X, X[:1]), Raises(ValueError, "residual"))
    case("nn.RMSNorm/int input", lambda b: rms(X.long()), Raises(TypeError, "input"))
    case("nn.Embedding/id too big", lambda b: emb(torch.tensor([10])), Raises(IndexError, "10"))
    case("nn.Embedding/float ids", lambda b: emb(torch.tensor([1.0])), Raises(TypeError, "input"))
    case("nn.LayerNorm/no rows", lambda b: ln(x32(0, 32)),
         Torch(lambda: F.layer_norm(x32(0, 32), (32,), ln.weight, ln.bias)))
    case("TransformerConfig/n_head 0", lambda b: TransformerConfig(n_head=0), Raises(ValueError, "n_head"))
    case("TransformerConfig/d_model str", lambda b: TransformerConfig(d_model="768"), Raises(TypeError, "d_model"))
    case("TransformerConfig/unknown field", lambda b: TransformerConfig.from_dict({"n_heads": 2}),
         Raises(ValueError, "n_heads"))
    case("TransformerConfig/n_kv_head", lambda b: TransformerConfig(n_kv_head=5), Raises(ValueError, "n_kv_head"))
    small = TransformerConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16)
    case("Transformer/ids float", lambda b: Transformer(small)(torch.zeros(1, 3)), Raises(ValueError, "ids"))
    case("Transformer/past block_size", lambda b: Transformer(small)(torch.zeros(1, 9, dtype=torch.long)),
         Raises(ValueError, "block_size"))
    case("generate/2.5 tokens", lambda b: Transformer(small).generate(torch.zeros(1, 2, dtype=torch.long), 2.5),
         Raises(TypeError, "max_new_tokens"))
    case("generate/temperature nan", lambda b: Transformer(small).generate(
        torch.zeros(1, 2, dtype=torch.long), 2, temperature=NAN), Raises(ValueError, "temperature"))


def _rotary_cases():
    r = ops.rotary_embedding
    q, k = x32(2, 4, 5, 16), x32(2, 2, 5, 16)
    cos, sin = x32(5, 16), x32(5, 16)
    pos = torch.arange(5)
    case("rotary/q list", lambda b: r(q.tolist(), k, cos, sin, backend=b), Raises(TypeError, "q"))
    case("rotary/k int", lambda b: r(q, k.long(), cos, sin, backend=b), Raises(TypeError, "k"))
    case("rotary/head dims differ", lambda b: r(q, k[..., :8], cos, sin, backend=b), Raises(ValueError, "head dim"))
    case("rotary/cos short", lambda b: r(q, k, cos[:4], sin[:4], backend=b), Raises(ValueError, "cos"))
    case("rotary/sin meta", lambda b: r(q, k, cos, sin.to("meta"), backend=b), Raises(ValueError, "sin"))
    case("rotary/odd head dim", lambda b: r(q[..., :15], k[..., :15], cos[:, :15], sin[:, :15], backend=b),
         Raises(ValueError, "even"))
    case("rotary/positions float", lambda b: r(q, k, position_ids=pos.float(), backend=b),
         Raises(TypeError, "position_ids"))
    case("rotary/theta nan", lambda b: r(q, k, position_ids=pos, theta=NAN, backend=b), Raises(ValueError, "theta"))
    case("rotary/no time", lambda b: r(x32(2, 4, 0, 16), x32(2, 2, 0, 16), position_ids=pos[:0], backend=b),
         Torch(lambda: (x32(2, 4, 0, 16), x32(2, 2, 0, 16))))
    case("rotary/transposed q", lambda b: r(x32(2, 5, 4, 16).transpose(1, 2), k, cos, sin, backend=b),
         Torch(lambda: r(x32(2, 5, 4, 16).transpose(1, 2), k, cos, sin, backend="torch")))
    case("rotary/nan q", lambda b: r(MIXED.reshape(1, 1, 4, 4), MIXED.reshape(1, 1, 4, 4), position_ids=pos[:4],
                                     backend=b),
         Torch(lambda: r(MIXED.reshape(1, 1, 4, 4), MIXED.reshape(1, 1, 4, 4), position_ids=pos[:4], backend="torch")))


_norm_cases()
_activation_cases()
_embedding_cases()
_attention_cases()
_quant_cases()
_module_cases()
_rotary_cases()

# Backend-free cases (quantize, configs, modules with their default backend) run once.
_ONCE = ("quantize/", "TransformerConfig/", "Transformer/", "generate/", "nn.")
PER_BACKEND = {k: v for k, v in CASES.items() if not k.startswith(_ONCE)}
ONCE = {k: v for k, v in CASES.items() if k.startswith(_ONCE)}


@pytest.mark.parametrize("name", list(PER_BACKEND))
def test_public_op(backend, device, name):
    if device != "cpu":
        pytest.skip("the tables build CPU tensors")
    call, want = PER_BACKEND[name]
    check(call, want, backend)


@pytest.mark.skipif(INTERPRET, reason="backend-free: run in the CPU suite")
@pytest.mark.parametrize("name", list(ONCE))
def test_backend_free(name):
    call, want = ONCE[name]
    check(call, want)


# --- the raw fastlm_C kernels, in a child process -------------------------------------------------

# (family, [(id, expression, words)]): each expression must raise RuntimeError naming `words`.
# The child evaluates them one after another and reports each; a crash names the case it was in.
_T = "torch.randn"
RAW = {
    "norm": [
        ("fwd weight short", "C.norm_fwd(x, w[:8], None, None, 1e-5, False)", "weight"),
        ("fwd weight long", "C.norm_fwd(x, torch.randn(64), None, None, 1e-5, False)", "weight"),
        ("fwd weight dtype", "C.norm_fwd(x, w.double(), None, None, 1e-5, False)", "weight"),
        ("fwd weight int", "C.norm_fwd(x, w.int(), None, None, 1e-5, False)", "weight"),
        ("fwd weight meta", "C.norm_fwd(x, w.to('meta'), None, None, 1e-5, False)", "weight|Meta"),
        ("fwd weight strided", "C.norm_fwd(x, torch.randn(64)[::2], None, None, 1e-5, False)", "weight"),
        ("fwd bias short", "C.norm_fwd(x, w, w[:1], None, 1e-5, False)", "bias"),
        ("fwd bias empty", "C.norm_fwd(x, w, w[:0], None, 1e-5, False)", "bias"),
        ("fwd residual short", "C.norm_fwd(x, None, None, x[:1].contiguous(), 1e-5, False)", "residual"),
        ("fwd residual 1-D", "C.norm_fwd(x, None, None, x.reshape(-1), 1e-5, False)", "residual"),
        ("fwd residual dtype", "C.norm_fwd(x, None, None, x.half(), 1e-5, True)", "residual"),
        ("fwd residual transposed", "C.norm_fwd(x[:, :4].contiguous(), None, None, x[:4, :4].t(), 1e-5, True)",
         "residual"),
        ("fwd x 1-D", "C.norm_fwd(w, None, None, None, 1e-5, False)", "x"),
        ("fwd x 3-D", "C.norm_fwd(x[None], None, None, None, 1e-5, False)", "x"),
        ("fwd x strided", "C.norm_fwd(x.t(), None, None, None, 1e-5, False)", "x"),
        ("fwd x int", "C.norm_fwd(x.int(), None, None, None, 1e-5, False)", "x"),
        ("fwd x bool", "C.norm_fwd(x > 0, None, None, None, 1e-5, False)", "x"),
        ("bwd dy short", "C.norm_bwd(x[:2].contiguous(), x, w, m4, r4, None, False, True)", "dy"),
        ("bwd dy dtype", "C.norm_bwd(x.double(), x, w, m4, r4, None, False, True)", "dy"),
        ("bwd weight short", "C.norm_bwd(x, x, w[:3], m4, r4, None, False, True)", "weight"),
        ("bwd mean short", "C.norm_bwd(x, x, w, m4[:1], r4, None, False, True)", "mean"),
        ("bwd mean dtype", "C.norm_bwd(x, x, w, m4.double(), r4, None, False, True)", "mean"),
        ("bwd rstd short", "C.norm_bwd(x, x, w, m4, r4[:0], None, True, False)", "rstd"),
        ("bwd rstd dtype", "C.norm_bwd(x, x, w, m4, r4.half(), None, True, False)", "rstd"),
        ("bwd rstd meta", "C.norm_bwd(x, x, w, m4, r4.to('meta'), None, True, False)", "rstd|Meta"),
        ("bwd dh short", "C.norm_bwd(x, x, w, m4, r4, x[:1].contiguous(), False, False)", "dh"),
        ("bwd dh dtype", "C.norm_bwd(x, x, w, m4, r4, x.double(), False, False)", "dh"),
        ("bwd x strided", "C.norm_bwd(x, x.t().contiguous().t(), w, m4, r4, None, False, False)", "x"),
    ],
    "activation": [
        ("fwd bias short", "C.bias_gelu_fwd(x, w[:3], True)", "bias"),
        ("fwd bias dtype", "C.bias_gelu_fwd(x, w.double(), True)", "bias"),
        ("fwd bias meta", "C.bias_gelu_fwd(x, w.to('meta'), True)", "bias|Meta"),
        ("fwd bias strided", "C.bias_gelu_fwd(x, torch.randn(64)[::2], False)", "bias"),
        ("fwd x int", "C.bias_gelu_fwd(x.int(), None, True)", "x"),
        ("fwd x 3-D", "C.bias_gelu_fwd(x[None], None, True)", "x"),
        ("fwd x strided", "C.bias_gelu_fwd(x.t(), None, True)", "x"),
        ("bwd dy short", "C.bias_gelu_bwd(x[:1].contiguous(), x, None, True, False)", "dy"),
        ("bwd dy dtype", "C.bias_gelu_bwd(x.half(), x, None, True, False)", "dy"),
        ("bwd dy strided", "C.bias_gelu_bwd(torch.randn(32, 4).t(), x, None, True, False)", "dy"),
        ("bwd dy meta", "C.bias_gelu_bwd(x.to('meta'), x, None, True, False)", "dy|Meta"),
        ("bwd bias short", "C.bias_gelu_bwd(x, x, w[:5], True, True)", "bias"),
        ("bwd x int", "C.bias_gelu_bwd(x.int(), x.int(), None, False, False)", "x"),
        ("silu fwd up short", "C.silu_mul_fwd(x, x[:, :8])", "up"),
        ("silu fwd up dtype", "C.silu_mul_fwd(x, x.double())", "up"),
        ("silu fwd up meta", "C.silu_mul_fwd(x, x.to('meta'))", "up|Meta"),
        ("silu fwd gate int", "C.silu_mul_fwd(x.int(), x.int())", "gate"),
        ("silu fwd gate 1-D", "C.silu_mul_fwd(w, w)", "gate"),
        ("silu fwd gate transposed", "C.silu_mul_fwd(x.t(), x.t())", "gate"),
        ("silu fwd up zero-stride", "C.silu_mul_fwd(x, x[:1].expand(4, 32))", "up"),
        ("silu bwd dy short", "C.silu_mul_bwd(x[:1], x, x)", "dy"),
        ("silu bwd dy dtype", "C.silu_mul_bwd(x.half(), x, x)", "dy"),
        ("silu bwd dy strided", "C.silu_mul_bwd(torch.randn(32, 4).t(), x, x)", "dy"),
    ],
    "embedding": [
        ("fwd id too big", "C.embedding_fwd(torch.tensor([1, 10]), tab)", "10"),
        ("fwd id negative", "C.embedding_fwd(torch.tensor([-3]), tab)", "-3"),
        ("fwd ids float", "C.embedding_fwd(torch.tensor([1.0]), tab)", "ids|Float|dtype"),
        ("tok_pos start past end", "C.tok_pos_embedding_fwd(torch.tensor([[1, 2]]), tab, tab[:3], 2)", "start_pos"),
        ("tok_pos start negative", "C.tok_pos_embedding_fwd(torch.tensor([[1, 2]]), tab, tab, -1)", "start_pos"),
        ("tok_pos width", "C.tok_pos_embedding_fwd(torch.tensor([[1, 2]]), tab, tab[:, :4].contiguous(), 0)", "width"),
        ("tok_pos ids 1-D", "C.tok_pos_embedding_fwd(torch.tensor([1, 2]), tab, tab, 0)", "ids"),
        ("tok_pos id too big", "C.tok_pos_embedding_fwd(torch.tensor([[1, 99]]), tab, tab, 0)", "99"),
        ("bwd id too big", "C.embedding_bwd(tab[:2].contiguous(), torch.tensor([1, 99]), 10, -1, False)", "99"),
        ("bwd dout rows", "C.embedding_bwd(tab[:3].contiguous(), torch.tensor([1, 2]), 10, -1, False)",
         "dout|ids|rows|shape"),
    ],
    "attention": [
        ("fwd k heads", "C.attention_fwd(q, q[:, :3].contiguous(), q, None, False, 0.25)", "k|head"),
        ("fwd v shape", "C.attention_fwd(q, q, q[:, :, :2].contiguous(), None, False, 0.25)", "v|shape"),
        ("fwd q 3-D", "C.attention_fwd(q[0], q[0], q[0], None, False, 0.25)", "q|4-D|dim"),
        ("fwd k dtype", "C.attention_fwd(q, q.double(), q, None, False, 0.25)", "k|dtype"),
        ("fwd mask shape", "C.attention_fwd(q, q, q, torch.zeros(1, 1, 2, 2), False, 0.25)", "mask"),
        ("fwd mask dtype", "C.attention_fwd(q, q, q, torch.zeros(2, 4, 8, 8, dtype=torch.bool), False, 0.25)", "mask"),
        ("decode seqlens big", "C.decode_attention(q[:, :, :1].contiguous(), q, q, torch.tensor([9, 2]), 0.25)",
         "seqlens|cache_seqlens"),
        ("decode seqlens shape", "C.decode_attention(q[:, :, :1].contiguous(), q, q, torch.tensor([2]), 0.25)",
         "seqlens|cache_seqlens"),
        ("decode v shape", "C.decode_attention(q[:, :, :1].contiguous(), q, q[:, :, :3].contiguous(), "
         "torch.tensor([2, 2]), 0.25)", "v_cache|shape"),
        ("bwd lse shape", "C.attention_bwd(q, q, q, q, q, torch.zeros(2, 4, 3), None, False, 0.25)", "lse"),
        ("bwd out shape", "C.attention_bwd(q, q, q, q, q[:1].contiguous(), torch.zeros(2, 4, 8), None, False, 0.25)",
         "out"),
    ],
    "rotary": [
        ("k head dim", "C.rotary_fwd(q, q[..., :8], c, c, False, False)", "k"),
        ("cos 2-D", "C.rotary_fwd(q, q, c[0], c[0], False, False)", "cos"),
        ("cos length", "C.rotary_fwd(q, q, c[:, :3].contiguous(), c[:, :3].contiguous(), False, False)", "cos"),
        ("sin dtype", "C.rotary_fwd(q, q, c, c.double(), False, False)", "sin"),
        ("cos odd", "C.rotary_fwd(q, q, c[..., :15].contiguous(), c[..., :15].contiguous(), False, False)",
         "rotary_dim"),
        ("q last stride", "C.rotary_fwd(q.transpose(2, 3), q, c, c, False, False)", "q"),
        ("q 3-D", "C.rotary_fwd(q[0], q[0], c, c, False, False)", "q"),
        ("positions int32", "C.rotary_pos_fwd(q, q, torch.arange(8)[None].int(), 1e4, 16, False, False)",
         "positions"),
        ("positions length", "C.rotary_pos_fwd(q, q, torch.arange(7)[None], 1e4, 16, False, False)", "positions"),
        ("theta", "C.rotary_pos_fwd(q, q, torch.arange(8)[None], 0.0, 16, False, False)", "theta"),
        ("rotary_dim", "C.rotary_pos_fwd(q, q, torch.arange(8)[None], 1e4, 18, False, False)", "rotary_dim"),
    ],
    "quant_matmul": [
        ("x K", "C.quant_matmul(torch.randn(3, 32), qw, sc, None, None, 8, 64)", "x|K|in_features"),
        ("qweight dtype", "C.quant_matmul(xq, qw.to(torch.uint8), sc, None, None, 8, 64)", "qweight"),
        ("scales short", "C.quant_matmul(xq, qw, sc[:2].contiguous(), None, None, 8, 64)", "scales"),
        ("bias short", "C.quant_matmul(xq, qw, sc, None, torch.randn(3), 8, 64)", "bias"),
        ("bits 3", "C.quant_matmul(xq, qw, sc, None, None, 3, 64)", "bits"),
        ("group 0", "C.quant_matmul(xq, q4, s4, None, None, 4, 0)", "group"),
        ("int4 qweight int8", "C.quant_matmul(xq, qw, sc, None, None, 4, 64)", "qweight"),
        ("zeros shape", "C.quant_matmul(xq, q4, s4, s4[:1].contiguous(), None, 4, 32)", "zeros"),
    ],
}

_CHILD = textwrap.dedent("""
    import json, re, sys, torch
    from fastlm import backends, quant
    assert backends.why_unavailable("cpu", "cpu") is None  # loads fastlm._C: torch.ops.fastlm_C
    C = torch.ops.fastlm_C
    torch.manual_seed(0)
    x, w, m4, r4 = torch.randn(4, 32), torch.randn(32), torch.zeros(4), torch.ones(4)
    tab, q = torch.randn(10, 8), torch.randn(2, 4, 8, 16)
    c = torch.randn(2, 8, 16)
    _q8 = quant.quantize(torch.randn(8, 64), 8)
    qw, sc, xq = _q8.qweight, _q8.scales, torch.randn(3, 64)
    _q4 = quant.quantize(torch.randn(8, 64), 4, 32)
    q4, s4 = _q4.qweight, _q4.scales
    for name, expr, words in json.loads(sys.argv[1]):
        print(json.dumps({"start": name}), flush=True)
        try:
            eval(expr)
            res = {"name": name, "raised": None}
        except Exception as e:
            res = {"name": name, "raised": type(e).__name__, "msg": str(e).splitlines()[0][:300],
                   "named": re.search(words, str(e)) is not None}
        print(json.dumps(res), flush=True)
""")


@pytest.mark.skipif(not CPU_BUILT or INTERPRET, reason="needs the cpu backend's fastlm._C; runs in the CPU suite")
@pytest.mark.parametrize("family", list(RAW))
def test_raw_kernels_in_a_child(family):
    """Each raw kernel refuses a broken contract with RuntimeError naming the argument, and never
    crashes: one child process runs the whole family's table."""
    cases = RAW[family]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    done = [r for r in lines if "name" in r]
    if proc.returncode != 0:
        started = [r["start"] for r in lines if "start" in r]
        pytest.fail(f"the child died (rc {proc.returncode}) in case {started[-1] if started else '?'}: "
                    f"{proc.stderr[-2000:]}")
    assert len(done) == len(cases)
    # RuntimeError from TORCH_CHECK; NotImplementedError (a RuntimeError) from the dispatcher for a
    # meta tensor, which has no kernel; IndexError for a bad id, by the embedding contract.
    bad = [r for r in done if r["raised"] not in ("RuntimeError", "NotImplementedError", "IndexError")
           or not r["named"]]
    assert not bad, "\n".join(f"{r['name']}: {r.get('raised')} {r.get('msg', '(no error)')}" for r in bad)


# --- corrupt checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = TransformerConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16)
    model = Transformer(cfg)
    out = tmp_path_factory.mktemp("ckpt")
    ftrain.save_checkpoint(out, 1, model.state_dict(), cfg, {"state": {}, "param_groups": []}, {"step": 1},
                           None, keep=1)
    return out / "step_000001"


def _edit(path: Path, fn) -> None:
    path.write_bytes(fn(path.read_bytes()))


CORRUPTIONS = {
    "model truncated": ("model.safetensors", lambda b: b[: len(b) // 2], "model.safetensors"),
    "model garbage": ("model.safetensors", lambda b: b"\xff" * 64, "model.safetensors"),
    "model empty": ("model.safetensors", lambda b: b"", "model.safetensors"),
    "model one bit": ("model.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1]), "model.safetensors"),
    "header F32 -> I32": ("model.safetensors", lambda b: b.replace(b'"F32"', b'"I32"', 1), "model.safetensors"),
    "config n_head 2 -> 4": ("config.json", lambda b: b.replace(b'"n_head": 2', b'"n_head": 4'), "config.json"),
    "config truncated": ("config.json", lambda b: b[:10], "config.json"),
    "config not utf-8": ("config.json", lambda b: b"\xff\xfe" + b, "config.json"),
    "checksums garbage": ("checksums.json", lambda b: b"{", "checksums.json"),
    "checksums wrong shape": ("checksums.json", lambda b: b'{"sha256": 3}', "checksums.json"),
    "checksums missing entry": ("checksums.json", lambda b: b'{"sha256": {}}', "model.safetensors|config.json"),
}
# Without checksums.json (an older checkpoint), the loaders' own checks must still name the file.
UNCHECKED = {
    "unchecked header F32 -> I32": ("model.safetensors", lambda b: b.replace(b'"F32"', b'"I32"', 1), "int32"),
    "unchecked config n_head 0": ("config.json", lambda b: b.replace(b'"n_head": 2', b'"n_head": 0'), "n_head"),
    "unchecked config n_head str": ("config.json", lambda b: b.replace(b'"n_head": 2', b'"n_head": "2"'), "n_head"),
    "unchecked config list": ("config.json", lambda b: b"[1, 2]", "config.json"),
    "unchecked config d_model 32": ("config.json", lambda b: b.replace(b'"d_model": 16', b'"d_model": 32'),
                                    "model.safetensors"),
    "unchecked model truncated": ("model.safetensors", lambda b: b[:100], "model.safetensors"),
}


@pytest.mark.skipif(INTERPRET, reason="runs in the CPU suite")
@pytest.mark.parametrize("name", [*CORRUPTIONS, *UNCHECKED])
def test_corrupt_checkpoint(checkpoint, tmp_path, name):
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(checkpoint, ckpt)
    file, fn, words = {**CORRUPTIONS, **UNCHECKED}[name]
    if name in UNCHECKED:
        (ckpt / "checksums.json").unlink()
    _edit(ckpt / file, fn)
    with pytest.raises(ftrain.CheckpointError) as info:
        if name in UNCHECKED:
            with pytest.warns(UserWarning, match="cannot be verified"):
                ftrain.load_model(ckpt)
        else:
            ftrain.load_model(ckpt)
    assert re.search(words, str(info.value)), str(info.value)


@pytest.mark.skipif(INTERPRET, reason="runs in the CPU suite")
@pytest.mark.parametrize("name", ["missing model", "missing config", "latest dangling", "not a checkpoint"])
def test_missing_checkpoint_parts(checkpoint, tmp_path, name):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint.parent, run)
    ckpt = run / checkpoint.name
    if name == "missing model":
        (ckpt / "model.safetensors").unlink()
    elif name == "missing config":
        (ckpt / "config.json").unlink()
    elif name == "latest dangling":
        (run / "latest").write_text("step_999\n")
    target = tmp_path / "nothing" if name == "not a checkpoint" else run
    with pytest.raises(ftrain.CheckpointError, match=r"model\.safetensors|config\.json|latest|no checkpoint"):
        ftrain.load_model(target)


# --- PyTorch's own OpInfo samples through fastlm.ops ------------------------------------------------

def _op_db(name: str):
    try:
        import expecttest  # noqa: F401
    except ImportError:
        # torch's test utilities import expecttest only to subclass its TestCase; the samples
        # need none of it, so a stand-in saves a test-only dependency.
        import types
        import unittest

        sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase)
    from torch.testing._internal.common_methods_invocations import op_db

    return next(o for o in op_db if o.name == name)


OPINFO = {
    # fastlm op, OpInfo name, how a sample's (input, args, kwargs) becomes a fastlm call
    "layer_norm": ("nn.functional.layer_norm", lambda s, b: ops.layer_norm(s.input, *s.args, **s.kwargs, backend=b)),
    "rms_norm": ("nn.functional.rms_norm", lambda s, b: ops.rms_norm(s.input, *s.args, **s.kwargs, backend=b)),
    # torch's embedding sample holds the table as its input and the ids as its first argument.
    "embedding": ("nn.functional.embedding", lambda s, b: ops.embedding(s.args[0], s.input, **s.kwargs, backend=b)),
    "sdpa": ("nn.functional.scaled_dot_product_attention",
             lambda s, b: ops.scaled_dot_product_attention(s.input, *s.args, **s.kwargs, backend=b)),
}


@pytest.mark.skipif(INTERPRET, reason="torch's samples include float64, which Triton does not run")
@pytest.mark.parametrize("name", list(OPINFO))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_samples(backend, device, name, dtype):
    if device != "cpu":
        pytest.skip("CPU samples")
    info = _op_db(OPINFO[name][0])
    run = OPINFO[name][1]
    n = 0
    for s in info.sample_inputs(device, dtype, requires_grad=False):
        if name == "embedding" and set(s.kwargs) - {"padding_idx"}:
            continue  # max_norm, scale_grad_by_freq, sparse: not fastlm.ops.embedding's signature
        want = info.op(s.input, *s.args, **s.kwargs)
        if name == "sdpa" and s.kwargs.get("dropout_p", 0.0) > 0:
            continue  # random
        got = run(s, backend)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
        n += 1
    assert n > 0


def test_table_is_large_enough():
    raw = sum(len(v) for v in RAW.values())
    assert len(CASES) + raw + len(CORRUPTIONS) + len(UNCHECKED) >= 200
    assert math.isfinite(len(CASES))


@pytest.mark.skipif(not CPU_BUILT or INTERPRET, reason="needs the cpu backend's fastlm._C; runs in the CPU suite")
def test_custom_ops_refuse_a_meta_tensor_beside_real_ones():
    """A meta tensor among real ones routes a torch.ops.fastlm call to its fake, which must refuse
    the mix (a RuntimeError, as the kernels' own contract checks) rather than return an
    uninitialised tensor."""
    x, meta = torch.randn(4, 8), torch.randn(8, device="meta")
    q, c = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    calls = [
        ("bias", lambda: torch.ops.fastlm.bias_gelu_fwd(x, meta, True, "cpu")),
        ("weight", lambda: torch.ops.fastlm.norm_fwd(x, meta, None, None, 1e-5, False, "cpu")),
        ("sin", lambda: torch.ops.fastlm.rotary_fwd(q, q, c, c.to("meta"), False, False, "cpu")),
    ]
    for name, call in calls:
        with pytest.raises(RuntimeError, match=name):
            call()
