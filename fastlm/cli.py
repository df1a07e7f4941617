"""The `fastlm` command: `fastlm info`, `fastlm bench`."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from fastlm.info import report

    print(report())
    return 0


def _bench(args) -> int:
    import torch

    from fastlm import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = list(bench.OPS) if args.op in (None, "all") else [args.op]
    bench.run(ops, device, args.quick, args.out, plot=not args.no_plot, reuse_memory=not args.default_allocator)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm", description="Fused kernels for Transformer language models.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, built kernels, usable backends, devices")
    s.set_defaults(func=_info)
    from fastlm.bench import OPS

    s = sub.add_parser("bench", help="benchmark fastlm backends against torch eager and torch.compile")
    s.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op (default: all)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    s.add_argument("--quick", action="store_true", help="one shape per op, fewer repetitions")
    s.add_argument("--out", default="benchmarks/results", help="folder for the JSON results and plots")
    s.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    s.add_argument("--default-allocator", action="store_true",
                   help="CPU: keep glibc's allocator as it is (large outputs page-fault on every call) "
                        "instead of reusing freed memory; results go to <machine>-default-alloc.json")
    s.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
