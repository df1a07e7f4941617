"""A decoder-only Transformer (GPT-2 style) built from fastlm's modules and ops.

    cfg = TransformerConfig.preset("tiny", vocab_size=2048)
    model = Transformer(cfg)
    logits, _ = model(ids)                                  # ids (B, T) int64
    _, loss = model(ids, targets)                           # the loss alone, without the logits
    out = model.generate(prompt_ids, 100, temperature=0.8, top_k=50, seed=0)

Token embedding plus a learned position embedding (or rotary positions inside attention),
pre-norm blocks (LayerNorm or RMSNorm) of causal self-attention and a GELU or SwiGLU MLP, a final norm,
and an output projection tied to the token embedding. Each block takes and returns the residual
stream beside its output, so every norm is fused with the residual add before it (the norm
modules' `residual=`), and the stream is read once per norm instead of twice; the loss is taken
a chunk of rows at a time, without the full logits (ops.linear_cross_entropy).

Decoding with a KV cache on the CPU, the Llama block (rmsnorm, rope, swiglu) whose projections
are all act_quant QuantLinears (fastlm.quantize_(..., act_quant=True)) runs as one kernel call
(_decode_blocks), and so does the whole stack of such blocks: at decode each kernel takes tens of
microseconds, and the Python around a layer's ten of them cost as much again.

`config.backend` (or `forward(..., backend=)`) runs the same weights through the torch reference
path ("torch") or a fastlm backend ("cpu", "cuda", "triton"; None = the best available).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm import backends, ops
from fastlm.nn import MLP, Embedding, LayerNorm, QuantLinear, RMSNorm, SwiGLU
from fastlm.nn.self_attention import CausalSelfAttention, KVCache, Rotary
from fastlm.ops.norm import _rms_eps


@dataclasses.dataclass
class TransformerConfig:
    vocab_size: int = 50304
    block_size: int = 1024          # the longest sequence the model sees
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None    # fewer key/value heads than query heads: grouped-query attention
    d_model: int = 768
    mlp_ratio: int = 4
    mlp: str = "gelu"               # or "swiglu": silu(gate) * up at 2/3 of the hidden width, same parameters
    norm: str = "layernorm"         # or "rmsnorm"
    pos: str = "learned"            # or "rope"
    rope_theta: float = 10000.0
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    causal: bool = True             # False: bidirectional attention (an encoder), with key-padding masks
    backend: str | None = None      # None: the best fastlm backend for the device

    PRESETS = {
        # ~1 M parameters at vocab 2048: trains on a 2-core CPU in minutes.
        "tiny": dict(vocab_size=2048, block_size=128, n_layer=4, n_head=4, d_model=128),
        # ~23 M parameters at vocab 8192.
        "small": dict(vocab_size=8192, block_size=512, n_layer=6, n_head=8, d_model=512),
        # GPT-2 small, 124 M parameters.
        "gpt2": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, d_model=768),
    }

    @classmethod
    def preset(cls, name: str, **overrides) -> TransformerConfig:
        if name not in cls.PRESETS:
            raise ValueError(f"TransformerConfig.preset: unknown preset {name!r}; choose one of "
                             f"{', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def __post_init__(self):
        # Sizes first: every later check divides by them.
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"TransformerConfig: {name} must be an int, got {type(v).__name__} {v!r}")
            if v <= 0:
                raise ValueError(f"TransformerConfig: {name} must be positive, got {v}")
        if self.n_kv_head is not None and (isinstance(self.n_kv_head, bool) or not isinstance(self.n_kv_head, int)):
            raise TypeError(f"TransformerConfig: n_kv_head must be an int or None, got {self.n_kv_head!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"TransformerConfig: norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"TransformerConfig: mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"TransformerConfig: pos must be 'learned' or 'rope', got {self.pos!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"TransformerConfig: d_model {self.d_model} must be divisible by n_head {self.n_head}")
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if kv <= 0 or self.n_head % kv:
            raise ValueError(f"TransformerConfig: n_head {self.n_head} must be a multiple of n_kv_head {kv}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ValueError(f"TransformerConfig: unknown backend {self.backend!r}; choose one of "
                             f"{', '.join(ops.BACKENDS)} or None")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TransformerConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
    return RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def swiglu_hidden(d_model: int, mlp_ratio: int) -> int:
    """SwiGLU's hidden width: 2/3 of the GELU MLP's, so that its three matrices hold as many
    parameters as the GELU MLP's two (Llama's rule), rounded up to a multiple of 8."""
    return 8 * math.ceil(2 * mlp_ratio * d_model / 3 / 8)


def _mlp(cfg: TransformerConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio), bias=cfg.bias, dropout=cfg.dropout)
    return MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias, dropout=cfg.dropout)


class Block(nn.Module):
    """One pre-norm layer. It takes the previous sub-layer's output x and the residual stream
    before it, and returns its own pair, so that each norm is fused with the residual add that
    precedes it (the first block gets residual None: x is the stream itself):

        h = x + residual;  y = norm1(h);  h = h + attn(y);  y = norm2(h);  return mlp(y), h
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = CausalSelfAttention(
            cfg.d_model, cfg.n_head, cfg.n_kv_head, bias=cfg.bias, dropout=cfg.dropout,
            rotary=cfg.pos == "rope", max_seq_len=cfg.block_size, rope_theta=cfg.rope_theta, causal=cfg.causal)
        self.norm2 = _norm(cfg)
        self.mlp = _mlp(cfg)

    def forward(self, x: Tensor, residual: Tensor | None = None, cache: KVCache | None = None, *,
                attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if cache is not None and attn_mask is None and (fused := _decode_blocks((self,), x, residual, (cache,))):
            return fused
        y, h = (self.norm1(x), x) if residual is None else self.norm1(x, residual)
        y, h = self.norm2(self.attn(y, cache, attn_mask=attn_mask), h)
        return self.mlp(y), h


def _hooked(*modules: nn.Module) -> bool:
    m = nn.modules.module
    if m._global_forward_hooks or m._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules)


class _Fusable(NamedTuple):
    shared: tuple  # (eps, n_head, n_kv_head, head_dim, theta, position): one for every block of a call
    norm1: Tensor
    norm2: Tensor
    linears: tuple  # qkv, proj, gate, up, down
    cache: KVCache


def _fusable(block: Block, cache: KVCache) -> _Fusable | None:
    """The parts of `block` that the fused decode call takes, when it is the quantized Llama block
    (RMSNorm, rotary attention, SwiGLU; every projection a QuantLinear with act_quant, any bias float32)
    in inference with no hooks, and its cache has room; None otherwise."""
    # Submodules, parameters and buffers straight from their dicts: nn.Module.__getattr__ is a
    # Python call per read, and this runs ~40 reads per block per token.
    mods = block._modules
    attn, mlp, n1, n2 = mods["attn"], mods["mlp"], mods["norm1"], mods["norm2"]
    if not (type(n1) is RMSNorm and type(n2) is RMSNorm and type(attn) is CausalSelfAttention
            and type(mlp) is SwiGLU and attn.causal) or block.training:
        return None
    am, mm = attn._modules, mlp._modules
    rotary = am.get("rotary")
    linears = (am["qkv"], am["proj"], mm["gate_proj"], mm["up_proj"], mm["down_proj"])
    if type(rotary) is not Rotary or not all(
            type(lin) is QuantLinear and lin.act_quant and lin.in_features % 32 == 0
            and (lin._parameters["bias"] is None or lin._parameters["bias"].dtype == torch.float32) for lin in linears):
        return None
    w1, w2 = n1._parameters["weight"], n2._parameters["weight"]
    if (w1 is None or w2 is None or n1.eps != n2.eps or cache.k.dtype != torch.float32
            or cache.seqlens.dtype != torch.int32 or cache.longest >= cache.max_len  # the modules say why
            or _hooked(block, attn, mlp, n1, n2, rotary, *linears)):
        return None
    return _Fusable((n1.eps, attn.n_head, attn.n_kv_head, attn.head_dim, rotary.theta, cache.longest), w1, w2,
                    linears, cache)


def _decode_blocks(blocks, x: Tensor, residual: Tensor | None, caches) -> tuple[Tensor, Tensor] | None:
    """The blocks, one after the other, in one kernel call (torch.ops.fastlm_C.decode_blocks,
    csrc/cpu/decode_block.cpp), which runs the modules' own kernels without the Python between
    them, when every block is _fusable, they decode one float32 token per sequence on the cpu
    backend without a gradient, and they share their shapes and position; None otherwise, and
    the modules run as usual."""
    if (x.dim() != 3 or x.shape[1] != 1 or not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled()
            or (residual is not None and (residual.dtype != torch.float32 or residual.shape != x.shape))
            or torch.compiler.is_compiling() or backends.choose("decode_blocks", x.device) != "cpu"):
        return None
    parts = [_fusable(block, cache) for block, cache in zip(blocks, caches)]
    if not parts or any(p is None or p.shared != parts[0].shared for p in parts):
        return None
    eps, n_head, n_kv_head, head_dim, theta, position = parts[0].shared
    linears = [lin for p in parts for lin in p.linears]
    bufs = [lin._buffers for lin in linears]
    kv = [p.cache for p in parts]
    out, h = torch.ops.fastlm_C.decode_blocks(
        x.contiguous(), None if residual is None else residual.contiguous(), [p.norm1 for p in parts],
        [p.norm2 for p in parts], _rms_eps(eps, x),  # the modules' rule for eps=None
        [d["qweight"] for d in bufs], [d["scales"] for d in bufs], [d["zeros"] for d in bufs],
        [lin._parameters["bias"] for lin in linears], [lin.bits for lin in linears],
        [lin.group_size for lin in linears], [c.k for c in kv], [c.v for c in kv], [c.seqlens for c in kv], position,
        n_head, n_kv_head, theta, 1.0 / math.sqrt(head_dim), [], [], head_dim, None, None, None)
    for c in kv:
        c.longest += 1
    return out, h


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = Embedding(cfg.block_size, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        # The output layer is the token embedding (tied); fastlm.quantize_(quantize_tied=True) puts a
        # quantized copy of it here, which the logits then go through.
        self.lm_head: nn.Module | None = None
        self.apply(self._init_weights)
        # GPT-2: each residual branch ends in a projection whose init shrinks with depth, so the
        # residual stream's variance does not grow with the number of layers.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    # --- forward -------------------------------------------------------------------------------

    def _backend_scope(self, backend: str | None):
        backend = backend if backend is not None else self.config.backend
        return ops.use_backend(backend) if backend is not None else contextlib.nullcontext()

    def hidden(self, ids: Tensor, caches: list[KVCache] | None = None, *, backend: str | None = None,
               key_padding_mask: Tensor | None = None) -> Tensor:
        """The final normed hidden states (B, T, d_model) for ids (B, T). key_padding_mask (B, T),
        True on real tokens, keeps a bidirectional model's queries off the padding; a causal one
        needs none when the padding is on the right, where no real token looks."""
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"Transformer: ids must be a (B, T) integer tensor, got {tuple(ids.shape)} {ids.dtype}")
        start = 0 if caches is None else caches[0].longest
        if start + ids.shape[1] > self.config.block_size:
            raise ValueError(f"Transformer: {start + ids.shape[1]} positions exceed block_size "
                             f"{self.config.block_size}")
        with self._backend_scope(backend):
            if self.wpe is not None:
                h = ops.token_position_embedding(ids, self.wte.weight, self.wpe.weight, start)
            else:
                h = ops.embedding(ids, self.wte.weight)
            x, residual = self.drop(h), None
            mask = None
            if key_padding_mask is not None and not self.config.causal:
                if key_padding_mask.shape != ids.shape or key_padding_mask.dtype != torch.bool:
                    raise ValueError(f"Transformer: key_padding_mask must be a bool tensor shaped like ids "
                                     f"{tuple(ids.shape)}, got {tuple(key_padding_mask.shape)} "
                                     f"{key_padding_mask.dtype}")
                mask = key_padding_mask[:, None, None, :]
            # At decode, the whole stack in one call where it can (_decode_blocks), else block by block.
            fused = None
            if caches is not None and mask is None and ids.shape[1] == 1 and len(caches) == len(self.blocks):
                fused = _decode_blocks(self.blocks, x, residual, caches)
            if fused is not None:
                x, residual = fused
            else:
                for i, block in enumerate(self.blocks):
                    x, residual = block(x, residual, None if caches is None else caches[i], attn_mask=mask)
            return self.norm_f(x) if residual is None else self.norm_f(x, residual)[0]

    def forward(self, ids: Tensor, targets: Tensor | None = None, *, backend: str | None = None,
                caches: list[KVCache] | None = None, return_logits: bool | None = None
                ) -> tuple[Tensor | None, Tensor | None]:
        """(logits (B, T, V), mean cross-entropy over targets (B, T) or None). Targets of -100
        are ignored. With targets the logits are not returned (None) unless return_logits=True:
        the loss is then computed chunk by chunk without them (ops.linear_cross_entropy)."""
        if targets is not None and targets.shape != ids.shape:
            raise ValueError(f"Transformer: targets {tuple(targets.shape)} must match ids {tuple(ids.shape)}")
        if return_logits is None:
            return_logits = targets is None
        y = self.hidden(ids, caches, backend=backend)
        head = self.lm_head
        if head is not None:  # a quantized output layer computes the logits, loss included
            return_logits = True
        if return_logits:
            logits = F.linear(y, self.wte.weight) if head is None else head(y)
        else:
            logits = None
        loss = None
        if targets is not None:
            if logits is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100)
            else:
                with self._backend_scope(backend):
                    loss = ops.linear_cross_entropy(y, self.wte.weight, targets, ignore_index=-100)
        return logits, loss

    # --- generation ----------------------------------------------------------------------------

    def new_caches(self, batch: int, max_len: int | None = None) -> list[KVCache]:
        max_len = self.config.block_size if max_len is None else max_len
        return [b.attn.new_cache(batch, max_len) for b in self.blocks]

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
                 eos_id: int | None = None, backend: str | None = None) -> Tensor:
        """Continue ids (B, T) by max_new_tokens tokens. temperature 0 is greedy; otherwise tokens
        are sampled, optionally from the top_k most likely or the smallest set whose probability
        reaches top_p. `seed` makes sampling reproducible. Stops early when every sequence has
        produced eos_id. Returns (B, T + new)."""
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate: ids must be (B, T) with T >= 1, got {tuple(ids.shape)}")
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        total = ids.shape[1] + max_new_tokens
        if total > self.config.block_size:
            raise ValueError(f"generate: prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"block_size {self.config.block_size}")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        try:
            caches = self.new_caches(ids.shape[0], total) if use_cache else None
            out, step_in = ids, ids
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            for _ in range(max_new_tokens):
                logits, _ = self(step_in if use_cache else out, caches=caches, backend=backend)
                nxt = _sample(logits[:, -1].float(), temperature, top_k, top_p, gen)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out = torch.cat((out, nxt[:, None]), dim=1)
                step_in = nxt[:, None]
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    for name, v, ok in (("max_new_tokens", max_new_tokens, _is_int), ("temperature", temperature, _is_real),
                        ("top_k", top_k, _is_int), ("top_p", top_p, _is_real)):
        if not ok(v) and not (v is None and name.startswith("top")):
            raise TypeError(f"generate: {name} must be {'an int' if ok is _is_int else 'a number'}, "
                            f"got {type(v).__name__} {v!r}")
    # NaN fails every comparison, so each range is tested as `not (in range)`.
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"generate: top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
            gen: torch.Generator | None) -> Tensor:
    """One token per row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
