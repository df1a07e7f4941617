"""Benchmark of the whole Transformer: the same weights on each fastlm backend, the torch path,
and torch.compile of the torch path.

Cases (timed by the harness, in TFLOP/s against the measured matmul rate):
    "<preset> train BxT"     forward / backward / forward+backward of the loss
    "<preset> prefill BxT"   forward of a prompt into an empty KV cache
    "<preset> decode B@ctx"  one new token per sequence against a cache holding ctx positions
FLOPs per token, N = parameters that multiply (all but the position table), L layers, width d:
    forward 2 N + 2 T d L (causal attention over T positions; 4 ctx d L when decoding)
    backward 2 x forward, forward+backward 3 x forward

`extra` times a full training step (forward, backward, AdamW) per competitor and reports tokens/s.
"""

from __future__ import annotations

import copy
import functools

import torch

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


def extra(device: torch.device, quick: bool) -> dict:
    tps = train_step_tokens_per_s(device, quick)
    print("training step (forward + backward + AdamW), tokens/s (median of interleaved runs):")
    for case, row in tps.items():
        print(f"  {case:<18}" + "  ".join(f"{name} {v:,.0f}" for name, v in row.items()))
    return {"train_step_tokens_per_s": tps}
