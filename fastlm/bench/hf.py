"""Hugging Face transformers models end to end: transformers eager, transformers + fastlm.patch,
and torch.compile of transformers, side by side.

Models (random weights, from configs; no download):
    llama-100m   Llama-shaped: 12 layers, width 768, 12 heads with 4 key/value heads, SwiGLU of
                 2048, vocab 32000, tied embedding (about 100 M parameters)
    gpt2-small   GPT-2 small's shape: 12 layers, width 768, 12 heads, vocab 50257 (124 M)

Measured per model and competitor, each in a fresh process (so one competitor's peak memory,
thread pools and compiled graphs do not reach the next):
    train        tokens/s of a whole step: forward with labels, backward, AdamW, at B x T
    peak         peak memory of that step: on the CPU the resident set's growth above its level
                 before the step (weights and AdamW state already allocated); on a GPU
                 torch.cuda.max_memory_allocated, everything included
    prefill      latency of one forward of a T-token prompt into an empty cache (batch 1)
    decode       per-token latency of greedy generate() after that prompt: (time of N + 1 new
                 tokens - time of 1) / N
torch.compile is timed on the training step and the prefill; generate() with a compiled forward
recompiles for every cache length (or needs a static cache), so its decode is not measured.

On the CPU (with fastlm's CPU extension) it also measures a quantized decode (quantized_decode) of
two shapes (DECODE_MODELS: the 0.65 B Llama of `fastlm bench --op model`'s, and Qwen3-0.6B's) as
transformers models, greedy generate() at batch 1 and 8: transformers float32 against the patched
model quantized by fastlm.quantize_ (int8, int4 in groups of 32), whose decode steps run the
decoder stack in one call (fastlm.hf_decode), and the same int4 model layer by layer through the
patched modules.

`cases` has no harness cases: a whole training step is not one op call, so everything is in `extra`.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import time

import torch

from fastlm.bench.harness import interleaved_ms

MODELS = {
    "llama-100m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                       max_position_embeddings=1024, tie_word_embeddings=True),
    "gpt2-small": dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
}
QUICK = dict(num_hidden_layers=2, n_layer=2)
COMPETITORS = ("transformers", "transformers+fastlm", "torch.compile")


def _shape(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(batch=8, seq=512, prompt=512, new=32, reps=5 if quick else 10)
    # Two CPU cores: an 8 x 512 step of the 100 M model takes about 25 s, so `fastlm bench` runs
    # 2 x 512 on a CPU to stay within minutes; `python -m fastlm.bench.hf --batch 8` runs 8 x 512.
    return dict(batch=1, seq=128, prompt=128, new=8, reps=2) if quick else \
        dict(batch=2, seq=512, prompt=512, new=8, reps=2)


def _build(name: str, quick: bool, device: torch.device):
    import transformers

    cfg = dict(MODELS[name])
    family = cfg.pop("model_type")
    if quick:
        cfg.update({k: v for k, v in QUICK.items() if k in cfg})
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return transformers.AutoModelForCausalLM.from_config(config).to(device, dtype)


def _peak(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from fastlm.bench.harness import host_peak_growth

    return host_peak_growth(fn)


def _timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _train(model, fwd, shape: dict, device: torch.device) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (shape["batch"], shape["seq"]), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compiles, allocates AdamW's state
    peak = _peak(step, device)  # and the second step, a compiled graph's first reuse
    secs = statistics.median(_timed(step, device) for _ in range(shape["reps"]))
    return {"train_tokens_per_s": ids.numel() / secs, "train_step_s": secs, "train_peak_bytes": peak}


@torch.no_grad()
def _infer(model, fwd, shape: dict, device: torch.device, decode: bool) -> dict:
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, shape["prompt"]), device=device)
    fwd(input_ids=prompt, use_cache=True)
    prefill = statistics.median(_timed(lambda: fwd(input_ids=prompt, use_cache=True), device)
                                for _ in range(shape["reps"]))
    out = {"prefill_ms": prefill * 1e3}
    if decode:
        kw = dict(do_sample=False, pad_token_id=0, use_cache=True)
        n = shape["new"]

        def gen(k):
            return _timed(lambda: model.generate(prompt, max_new_tokens=k, min_new_tokens=k, **kw), device)

        gen(2)
        one = statistics.median(gen(1) for _ in range(shape["reps"]))
        many = statistics.median(gen(n + 1) for _ in range(shape["reps"]))
        out["decode_ms_per_token"] = (many - one) / n * 1e3
    return out


def measure(name: str, competitor: str, device: str, quick: bool, shape: dict | None = None,
            train_only: bool = False) -> dict:
    """One model and competitor, in this process; shape overrides the device's default one."""
    import fastlm

    dev = torch.device(device)
    shape = {**_shape(dev, quick), **(shape or {})}
    model = _build(name, quick, dev)
    fwd = model
    if competitor == "transformers+fastlm":
        fastlm.patch(model)
    elif competitor == "torch.compile":
        fwd = torch.compile(model)
    res = _train(model, fwd, shape, dev)
    if not train_only:
        res.update(_infer(model, fwd, shape, dev, competitor != "torch.compile"))
    if competitor == "transformers+fastlm":
        res["swapped"] = fastlm.hf.patch_report(model)
    res["params"] = sum(p.numel() for p in model.parameters())
    return res


DECODE_MODELS = {
    # The 0.65 B Llama shape of `fastlm bench --op model`'s quantized decode
    # (fastlm.bench.model.DECODE_CONFIG), as a transformers Llama.
    "llama-0.65b": dict(model_type="llama", vocab_size=32000, hidden_size=1536, intermediate_size=4096,
                        num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4,
                        max_position_embeddings=1024, tie_word_embeddings=True),
    # Qwen3-0.6B's shape: head_dim 128 over a width of 1024, per-head q and k norms, a 151936-token
    # vocabulary tied to the embedding.
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=1024, tie_word_embeddings=True),
}
# name -> (quantize_ arguments or None for the float32 model unpatched, decode stack in one call)
DECODE_COMPETITORS = {
    "transformers fp32": (None, False),
    "+fastlm int8": (dict(bits=8, act_quant=True, quantize_tied=True), True),
    "+fastlm int4/32": (dict(bits=4, group_size=32, act_quant=True, quantize_tied=True), True),
    "+fastlm int4/32 per layer": (dict(bits=4, group_size=32, act_quant=True, quantize_tied=True), False),
}


@torch.no_grad()
def quantized_decode(quick: bool = False, config: dict | None = None, model: str = "llama-0.65b") -> dict:
    """Greedy generate() tokens/s of a transformers Llama on the CPU: float32 as transformers runs
    it, and patched and quantized (fastlm.quantize_ with act_quant) with the decoder stack in one
    kernel call (fastlm.hf_decode) or layer by layer through the patched modules. Competitors are
    timed in turns in this process; decode tokens/s = batch x new / (time of 1 + new tokens - time
    of 1 token), after a 16-token prompt. model names a DECODE_MODELS shape; config overrides it (a
    test's small model)."""
    import transformers

    import fastlm
    from fastlm import hf_decode
    from fastlm.bench.quant_matmul import read_bandwidth

    bw = read_bandwidth(torch.device("cpu"))
    cfg = dict(DECODE_MODELS[model], num_hidden_layers=2) if quick else dict(DECODE_MODELS[model])
    cfg.update(config or {})
    family = cfg.pop("model_type")
    prompt, new, reps = (16, 4, 2) if quick else (16, 16, 3)
    models = {}
    for name, (args, fused) in DECODE_COMPETITORS.items():
        torch.manual_seed(0)
        shared = next((m for n, (m, _) in models.items() if DECODE_COMPETITORS[n][0] == args), None)
        if shared is None:
            shared = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(family, **cfg))
            shared.eval()
            if args is not None:
                fastlm.quantize_(fastlm.patch(shared), **args)
        models[name] = (shared, fused)

    def run(net, fused, ids, n):
        hf_decode.ENABLED = fused
        try:
            net.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        finally:
            hf_decode.ENABLED = True

    rates = {}
    for b in (1, 8):
        ids = torch.randint(3, cfg["vocab_size"], (b, prompt), generator=torch.Generator().manual_seed(b))
        fns = {}
        for name, (net, fused) in models.items():
            fns[f"{name} +1"] = functools.partial(run, net, fused, ids, 1)
            fns[f"{name} +{1 + new}"] = functools.partial(run, net, fused, ids, 1 + new)
        ms = interleaved_ms(fns, torch.device("cpu"), warmup=1, reps=reps)
        rates[b] = {name: b * new / ((ms[f"{name} +{1 + new}"] - ms[f"{name} +1"]) * 1e-3) for name in models}
    base = rates[1]["transformers fp32"]
    print(f"transformers {model}, {cfg['num_hidden_layers']} layers x {cfg['hidden_size']}, greedy decode after "
          f"{prompt} tokens, read bandwidth {bw:.1f} GB/s, competitors in turns:")
    print(f"  {'competitor':<28}{'b1 tok/s':>10}{'b8 tok/s':>10}{'b1 x fp32':>10}")
    rows = {}
    for name in models:
        rows[name] = {"decode_b1_tok_s": rates[1][name], "decode_b8_tok_s": rates[8][name]}
        print(f"  {name:<28}{rates[1][name]:>10.2f}{rates[8][name]:>10.2f}{rates[1][name] / base:>10.2f}")
    return {"model": model, "config": dict(cfg, model_type=family), "prompt": prompt, "new": new, "read_GBps": bw,
            "rows": rows}


def _worker() -> None:
    args = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(measure(**args)), flush=True)


def cases(device: torch.device, quick: bool = False) -> list:
    return []


def _row(name: str, comp: str, r: dict, base: dict) -> str:
    speed = r["train_tokens_per_s"] / base["train_tokens_per_s"]
    dec = f"{r['decode_ms_per_token']:.1f}" if "decode_ms_per_token" in r else "-"
    pre = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else "-"
    return (f"{name:<12}{comp:<22}{r['train_tokens_per_s']:>12.1f}{speed:>8.2f}x{r['train_peak_bytes'] / 2**20:>11.0f}"
            f"{pre:>12}{dec:>12}")


def extra(device: torch.device, quick: bool = False, shape: dict | None = None, train_only: bool = False,
          models: tuple = tuple(MODELS)) -> dict:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        print("hf: skipped, transformers is not installed (pip install fastlm[hf])")
        return {"skipped": "transformers is not installed"}
    shape = {**_shape(device, quick), **(shape or {})}
    print(f"hf: training step at {shape['batch']} x {shape['seq']} tokens"
          + ("" if train_only else f", prefill of {shape['prompt']}, decode of {shape['new']} tokens after it")
          + f"; median of {shape['reps']}")
    results: dict = {"shape": shape, "models": {}}
    for name in models:
        per = results["models"][name] = {}
        for comp in COMPETITORS:
            args = json.dumps(dict(name=name, competitor=comp, device=str(device), quick=quick, shape=shape,
                                   train_only=train_only))
            code = "from fastlm.bench.hf import _worker; _worker()"
            proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"  {name} {comp}: failed\n{proc.stderr[-2000:]}")
                continue
            per[comp] = json.loads(line[-1].removeprefix("RESULT "))
            print(f"  {name} {comp}: done", flush=True)
    if device.type == "cpu" and not train_only:
        from fastlm import backends

        if "cpu" in backends.available("cpu"):
            results["quantized_decode"] = {name: quantized_decode(quick, model=name) for name in DECODE_MODELS}
    head = (f"{'model':<12}{'competitor':<22}{'train tok/s':>12}{'vs eager':>9}{'peak MiB':>11}"
            f"{'prefill ms':>12}{'ms/token':>12}")
    print(head + "\n" + "-" * len(head))
    for name, per in results["models"].items():
        base = per.get("transformers")
        for comp, r in per.items():
            print(_row(name, comp, r, base or r))
        if "transformers+fastlm" in per:
            print(f"{'':<12}swapped: {per['transformers+fastlm']['swapped']}")
    return results


if __name__ == "__main__":
    # Another shape than `fastlm bench --op hf`'s, e.g. the 8 x 512 training step on a CPU:
    #   python -m fastlm.bench.hf --batch 8 --seq 512 --train-only --model llama-100m --json out.json
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--model", action="append", choices=tuple(MODELS), help="(default: all)")
    p.add_argument("--train-only", action="store_true", help="skip prefill and decode")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    over = {k: v for k, v in dict(batch=a.batch, seq=a.seq, reps=a.reps).items() if v}
    out = extra(torch.device(a.device), shape=over, train_only=a.train_only, models=tuple(a.model or MODELS))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
