"""Benchmark of the whole Transformer: the same weights on each fastlm backend, the torch path,
and torch.compile of the torch path.

Cases (timed by the harness, in TFLOP/s against the measured matmul rate):
    "<preset> train BxT"     forward / backward / forward+backward of the loss
    "<preset> prefill BxT"   forward of a prompt into an empty KV cache
    "<preset> decode B@ctx"  one new token per sequence against a cache holding ctx positions
FLOPs per token, N = parameters that multiply (all but the position table), L layers, width d:
    forward 2 N + 2 T d L (causal attention over T positions; 4 ctx d L when decoding)
    backward 2 x forward, forward+backward 3 x forward

`extra` times a full training step (forward, backward, AdamW) per competitor and reports tokens/s;
on the CPU also quantized decode end to end (quantized_decode): a Llama-shaped configuration of
the model (rope, rmsnorm, grouped-query attention, SwiGLU, no biases; random weights) through
`fastlm.quantize_` and `model.generate`, float32 on the torch path against fastlm int8 and int4,
tokens/s at batch 1 and 8 and for a 512-token prefill, and the bytes a decode step reads over the
read bandwidth measured in the same run ("bandwidth achieved").
"""

from __future__ import annotations

import copy
import functools

import torch

import fastlm
from fastlm import backends
from fastlm.bench import harness
from fastlm.bench.harness import Case
from fastlm.model import Transformer, TransformerConfig


def _shapes(device: torch.device, quick: bool) -> dict[str, tuple[int, int]]:
    """preset -> (batch, seq_len) of the training case, sized to the device."""
    if device.type == "cuda":
        # gpt2 is the shape that matters on a GPU; the quick run (a time-limited check) keeps to it.
        return {"gpt2": (8, 1024)} if quick else {"small": (16, 512), "gpt2": (8, 1024)}
    return {"tiny": (8, 128), "small": (1, 128)} if quick else {"tiny": (16, 128), "small": (2, 256)}


def _model(preset: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.preset(preset)).to(device, dtype)


def _flops_fwd(model: Transformer, tokens: int, ctx: int, causal: bool) -> float:
    cfg = model.config
    n = model.num_params() - (model.wpe.weight.numel() if model.wpe is not None else 0)
    attn = (2 if causal else 4) * ctx * cfg.d_model * cfg.n_layer
    return tokens * (2 * n + attn)


def _compiled(fn):
    compiled = torch.compile(fn, dynamic=False)

    def run(*args, **kwargs):
        # The harness times backward alone by reusing one graph (retain_graph=True), which a
        # compiled backward refuses when it donates its buffers.
        with torch._functorch.config.patch(donated_buffer=False):
            return compiled(*args, **kwargs)

    return run


def _competitors(model: Transformer, device: torch.device, call, compile: bool = True) -> dict:
    """name -> fn, where call(model, backend, *inputs) runs the model on one backend."""
    impls = {f"fastlm-{b}": functools.partial(call, model, b)
             for b in backends.available(device.type) if b != "torch"}
    impls["torch"] = functools.partial(call, model, "torch")
    if compile:
        impls["torch.compile"] = _compiled(functools.partial(call, model, "torch"))
    return impls


def _loss(model, backend, ids, targets, *params):
    return model(ids, targets, backend=backend)[1]


# Inference runs without autograd, as generate() does: a graph that writes tensors needing grad
# into the cache is neither what inference does nor something torch.compile accepts.
@torch.no_grad()
def _prefill(model, backend, ids, caches):
    for c in caches:
        c.reset()
    return model(ids, caches=caches, backend=backend)[0]


@torch.no_grad()
def _decode(model, backend, ids, caches, ctx):
    # Rewind every cache to ctx positions, so that each call decodes the same step.
    for c in caches:
        c.seqlens.fill_(ctx)
        c.longest = ctx
    return model(ids, caches=caches, backend=backend)[0]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    # Compiling gpt2 takes most of a minute per graph: a quick GPU run compiles only the training
    # step (here and in `extra`), where the comparison with torch.compile is the point.
    compile_inference = not (device.type == "cuda" and quick)
    out = []
    for preset, (b, t) in _shapes(device, quick).items():
        model = _model(preset, device, dtype)
        v = model.config.vocab_size
        fwd = _flops_fwd(model, b * t, t, causal=True)

        def make_train(model=model, b=b, t=t, v=v):
            ids = torch.randint(0, v, (b, t + 1), device=device)
            return (ids[:, :-1], ids[:, 1:], *model.parameters())

        out.append(Case(
            op="model", name=f"{preset} train {b}x{t}", shape=(b, t), dtype=dtype, make=make_train,
            impls=_competitors(model, device, _loss), metric="TFLOP/s",
            work={"fwd": fwd, "bwd": 2 * fwd, "fwdbwd": 3 * fwd},
        ))

        prompt = t
        caches = model.new_caches(b, prompt + 1)
        out.append(Case(
            op="model", name=f"{preset} prefill {b}x{prompt}", shape=(b, prompt), dtype=dtype,
            make=functools.partial(lambda b, p, v: (torch.randint(0, v, (b, p), device=device), ), b, prompt, v),
            impls={k: functools.partial(fn, caches=caches)
                   for k, fn in _competitors(model, device, _prefill, compile_inference).items()},
            metric="TFLOP/s", work={"fwd": _flops_fwd(model, b * prompt, prompt, causal=True)}, passes=("fwd",),
        ))

        ctx = t - 1  # the decoded token fills the last position of the context
        caches = model.new_caches(b, ctx + 1)
        model(torch.randint(0, v, (b, ctx), device=device), caches=caches, backend="torch")
        out.append(Case(
            op="model", name=f"{preset} decode {b}@{ctx}", shape=(b, ctx), dtype=dtype,
            make=functools.partial(lambda b, v: (torch.randint(0, v, (b, 1), device=device), ), b, v),
            impls={k: functools.partial(fn, caches=caches, ctx=ctx)
                   for k, fn in _competitors(model, device, _decode, compile_inference).items()},
            metric="TFLOP/s", work={"fwd": _flops_fwd(model, b, ctx, causal=False)}, passes=("fwd",),
        ))
    return out


def train_step_tokens_per_s(device: torch.device, quick: bool = False, reps: int | None = None,
                            compile: bool = True) -> dict:
    """Tokens per second of a whole training step (forward, backward, AdamW), per competitor,
    timed in turns. Each competitor steps its own copy of the same initial weights."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    reps = reps or (5 if quick else 10)
    result = {}
    for preset, (b, t) in _shapes(device, quick).items():
        base = _model(preset, device, dtype)
        ids = torch.randint(0, base.config.vocab_size, (b, t + 1), device=device)
        steps = {}
        names = [f"fastlm-{x}" for x in backends.available(device.type) if x != "torch"] + ["torch"]
        names += ["torch.compile"] if compile else []
        for name in names:
            model = copy.deepcopy(base)
            # The trainer's optimizer, the same for every competitor: only the model differs.
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            backend = name.removeprefix("fastlm-") if name.startswith("fastlm-") else "torch"
            fn = functools.partial(_loss, model, backend)
            if name == "torch.compile":
                fn = torch.compile(fn, dynamic=False)

            def step(fn=fn, opt=opt, ids=ids):
                fn(ids[:, :-1], ids[:, 1:]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[name] = step
        ms = harness.interleaved_ms(steps, device, warmup=2, reps=reps)
        result[f"{preset} {b}x{t}"] = {name: b * t / (m * 1e-3) for name, m in ms.items()}
    return result


# --- quantized decode end to end -----------------------------------------------------------------

# About 0.65 B parameters: 24 layers of width 1536, 12 query heads and 4 key/value heads of 128,
# a SwiGLU MLP of width 4096, Llama's vocabulary. The output projection is tied to the embedding
# (197 MB in float32): the quantized competitors quantize it too (quantize_tied), into the
# model's lm_head, while the embedding lookup keeps the float table.
DECODE_CONFIG = dict(vocab_size=32000, block_size=1024, n_layer=24, n_head=12, n_kv_head=4, d_model=1536,
                     mlp_ratio=4, mlp="swiglu", norm="rmsnorm", pos="rope", bias=False)
# name -> quantize_ arguments (None: the float32 model on the torch path)
DECODE_COMPETITORS = {
    "torch fp32": None,
    "fastlm int8": dict(bits=8, act_quant=True, quantize_tied=True),
    "fastlm int4/32": dict(bits=4, group_size=32, act_quant=True, quantize_tied=True),
    "fastlm int4/32 bf16-scales": dict(bits=4, group_size=32, act_quant=True, scale_dtype=torch.bfloat16,
                                       quantize_tied=True),
    "fastlm int4/32 float path": dict(bits=4, group_size=32, act_quant=False, quantize_tied=True),
}


def _decode_model(cfg: dict, args: dict | None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**cfg)).eval()
    if args is not None:
        fastlm.quantize_(model, **args)
    return model


def _read_bytes_per_token(model: Transformer, ctx: int) -> int:
    """Bytes one decode step of one sequence reads: every weight once (the tied embedding as the
    output projection) and the KV cache over ctx positions."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if model.lm_head is not None:  # a quantized output layer: the float table is only looked up
        weights -= model.wte.weight.numel() * model.wte.weight.element_size()
    cfg = model.config
    kv = 2 * cfg.n_layer * (cfg.n_kv_head or cfg.n_head) * (cfg.d_model // cfg.n_head) * ctx * 4
    return weights + kv


@torch.no_grad()
def _decode_tokens_per_s(models: dict, batch: int, prompt: int, new: int, reps: int) -> dict[str, float]:
    """Decode tokens/s of each (model, backend) in models: a generate of 1 + new tokens after a
    prompt, less one of 1 token (the prefill and the first token), both timed in turns with every
    other competitor's, so that a slow stretch of the machine hits them alike."""
    fns = {}
    for name, (model, backend) in models.items():
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt))
        gen = functools.partial(model.generate, ids, temperature=0.0, backend=backend)
        fns[f"{name} +1"] = functools.partial(gen, max_new_tokens=1)
        fns[f"{name} +{1 + new}"] = functools.partial(gen, max_new_tokens=1 + new)
    ms = harness.interleaved_ms(fns, torch.device("cpu"), warmup=1, reps=reps)
    return {name: batch * new / ((ms[f"{name} +{1 + new}"] - ms[f"{name} +1"]) * 1e-3) for name in models}


@torch.no_grad()
def _prefill_tokens_per_s(models: dict, tokens: int, reps: int) -> dict[str, float]:
    """Tokens/s of a forward of a `tokens`-token prompt into an empty cache, in turns."""
    def prefill(model, backend, ids):
        model(ids, caches=model.new_caches(1, tokens), backend=backend)

    fns = {name: functools.partial(prefill, model, backend, torch.randint(0, model.config.vocab_size, (1, tokens)))
           for name, (model, backend) in models.items()}
    ms = harness.interleaved_ms(fns, torch.device("cpu"), warmup=1, reps=reps)
    return {name: tokens / (v * 1e-3) for name, v in ms.items()}


def quantized_decode(quick: bool = False, config: dict | None = None) -> dict:
    """Tokens/s of each DECODE_COMPETITORS entry, all of them built first and then timed in turns
    (one after another, a host whose speed drifts by tens of percent within a minute, as the
    2-vCPU VMs here do, skews their ratios); see the module docstring. config overrides
    DECODE_CONFIG (a test's small model)."""
    from fastlm.bench.quant_matmul import read_bandwidth

    cpu = torch.device("cpu")
    bw = read_bandwidth(cpu)
    prompt, new, reps = (16, 4, 2) if quick else (16, 16, 3)
    cfg = dict(DECODE_CONFIG, n_layer=2) if quick else dict(DECODE_CONFIG)
    cfg.update(config or {})
    models = {name: (_decode_model(cfg, args), "torch" if args is None else "cpu")
              for name, args in DECODE_COMPETITORS.items()}
    rates = {b: _decode_tokens_per_s(models, b, prompt, new, reps) for b in (1, 8)}
    prefill = _prefill_tokens_per_s(models, 128 if quick else 512, 1 if quick else 2)
    out = {"config": cfg, "read_GBps": bw, "rows": {}}
    for name, (model, _) in models.items():
        row = {"params": model.num_params(), "bytes_per_token": _read_bytes_per_token(model, prompt + new // 2),
               "decode_b1_tok_s": rates[1][name], "decode_b8_tok_s": rates[8][name],
               "prefill_512_tok_s": prefill[name]}
        row["achieved_GBps"] = row["bytes_per_token"] * row["decode_b1_tok_s"] / 1e9
        row["pct_read_bw"] = 100 * row["achieved_GBps"] / bw
        out["rows"][name] = row
    del models
    base = out["rows"]["torch fp32"]
    print(f"quantized decode, {cfg['n_layer']} layers x {cfg['d_model']} "
          f"({base['params'] / 1e9:.2f} B parameters), read bandwidth {bw:.1f} GB/s, competitors in turns:")
    print(f"  {'competitor':<28}{'MB/token':>9}{'b1 tok/s':>10}{'b8 tok/s':>10}{'prefill tok/s':>15}"
          f"{'GB/s':>7}{'% read':>8}{'b1 x fp32':>10}")
    for name, r in out["rows"].items():
        print(f"  {name:<28}{r['bytes_per_token'] / 1e6:>9.0f}{r['decode_b1_tok_s']:>10.2f}"
              f"{r['decode_b8_tok_s']:>10.2f}{r['prefill_512_tok_s']:>15.1f}{r['achieved_GBps']:>7.1f}{r['pct_read_bw']:>7.0f}%"
              f"{r['decode_b1_tok_s'] / base['decode_b1_tok_s']:>10.2f}")
    return out


# The block variants compared at one parameter count: GPT-2's (learned positions, GELU) and
# Llama's (rotary positions, SwiGLU at 2/3 width), each with its usual norm.
ARCHITECTURES = {
    "learned+gelu": dict(pos="learned", mlp="gelu"),
    "rope+swiglu": dict(pos="rope", mlp="swiglu", norm="rmsnorm"),
}


def architecture_tokens_per_s(device: torch.device, quick: bool = False, reps: int | None = None) -> dict:
    """Training-step tokens/s of each ARCHITECTURES variant of one preset on fastlm's best backend
    for the device, timed in turns, with the parameter counts."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    preset, (b, t) = next(iter(_shapes(device, quick).items()))
    backend = backends.choose("model", device)
    steps, params = {}, {}
    for name, over in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = Transformer(TransformerConfig.preset(preset, **over)).to(device, dtype)
        params[name] = model.num_params()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, model.config.vocab_size, (b, t + 1), device=device)
        fn = functools.partial(_loss, model, backend)

        def step(fn=fn, opt=opt, ids=ids):
            fn(ids[:, :-1], ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    ms = harness.interleaved_ms(steps, device, warmup=2, reps=reps or (5 if quick else 15))
    return {"case": f"{preset} {b}x{t}", "backend": backend,
            "tokens_per_s": {n: b * t / (m * 1e-3) for n, m in ms.items()}, "params": params}


def extra(device: torch.device, quick: bool) -> dict:
    tps = train_step_tokens_per_s(device, quick)
    print("training step (forward + backward + AdamW), tokens/s (median of interleaved runs):")
    for case, row in tps.items():
        print(f"  {case:<18}" + "  ".join(f"{name} {v:,.0f}" for name, v in row.items()))
    arch = architecture_tokens_per_s(device, quick)
    print(f"block variants, {arch['case']} on fastlm-{arch['backend']}, tokens/s (parameters):")
    print("  " + "  ".join(f"{n} {v:,.0f} ({arch['params'][n] / 1e6:.2f} M)" for n, v in arch["tokens_per_s"].items()))
    res = {"train_step_tokens_per_s": tps, "architectures": arch}
    if device.type == "cpu" and "cpu" in backends.available("cpu"):
        res["quantized_decode"] = quantized_decode(quick)
    return res
