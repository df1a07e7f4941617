"""`fastlm bench`: every op's cases on one device, one process; a table, a JSON file, a plot.

Results go to <out>/<machine>.json (one file per machine, one section per op, merged across
runs) and <out>/<machine>-<op>.png.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from pathlib import Path

import torch

from fastlm.bench import harness
from fastlm.info import machine_name, summary

OPS = ("norm", "embedding", "activation", "attention", "quant_matmul", "model")


def _module(op: str):
    if op in OPS:
        return importlib.import_module(f"fastlm.bench.{op}")
    raise ValueError(f"bench: unknown op {op!r}; choose from {', '.join(OPS)}")


def run(ops: list[str], device: str, quick: bool, out: str, plot: bool = True, reuse_memory: bool = True) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    print(f"machine: {machine_name(dev)}")
    reuse = reuse_memory and dev.type == "cpu" and harness.reuse_freed_host_memory()
    if dev.type == "cpu":
        print("host allocator: " + ("freed memory is reused (glibc mmap disabled), for every competitor alike"
                                    if reuse else "glibc's default (large outputs page-fault on every call)"))
    bw = harness.copy_bandwidth(dev)
    print(f"measured copy bandwidth: {bw:.1f} GB/s (read + write)")
    rates: dict[str, float] = {}

    def ceiling(case: harness.Case) -> float:
        """Copy bandwidth for memory-bound cases; the dense matmul rate in the case's dtype otherwise."""
        if case.metric == "GB/s":
            return bw
        key = str(case.dtype).removeprefix("torch.")
        if key not in rates:
            rates[key] = harness.matmul_rate(dev, case.dtype)
            print(f"measured matmul rate ({key}): {rates[key]:.3f} TFLOP/s")
        return rates[key]

    results = {}
    for op in ops:
        module = _module(op)
        rows = []
        for case in module.cases(dev, quick):
            print(f"running {case.name} ({case.dtype}) ...", flush=True)
            rows += harness.run_case(case, dev, ceiling(case), reps=7 if quick else 15)
        print(harness.format_table(rows))
        results[op] = {"ceiling": {"copy_GBps": bw, "matmul_TFLOPs": dict(rates)}, "host_memory_reused": reuse,
                       "rows": [dataclasses.asdict(r) for r in rows]}
        # Measurements that are not timings (e.g. attention's peak memory against length).
        if hasattr(module, "extra"):
            results[op]["extra"] = module.extra(dev, quick)
    # Runs under glibc's default allocator go to a file of their own, beside the main results.
    name = machine_name(dev) + ("" if reuse or dev.type != "cpu" else "-default-alloc")
    path = save(results, dev, quick, out, name)
    print(f"wrote {path}")
    if plot:
        for op, res in results.items():
            png = draw(op, res["rows"], Path(out) / f"{name}-{op}.png")
            if png:
                print(f"wrote {png}")
    return results


def save(results: dict, dev: torch.device, quick: bool, out: str, name: str) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc["machine"] = summary(dev)
    ops = doc.setdefault("ops", {})
    for op, res in results.items():
        ops[op] = {**res, "quick": quick, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def draw(op: str, rows: list[dict], path: Path) -> Path | None:
    """One panel per pass: share of copy bandwidth (or matmul rate) for each case and impl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    passes = [p for p in harness.PASSES if any(r["pass_"] == p for r in rows)]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4.5), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, p in zip(axes[0], passes):
        for k, impl in enumerate(impls):
            vals = [next((r["pct_ceiling"] for r in rows if r["case"] == c and r["impl"] == impl
                          and r["pass_"] == p), 0.0) for c in cases]
            ax.bar([i + k * width for i in range(len(cases))], vals, width, label=impl)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{op}: {p}")
        ax.set_ylabel("% of measured ceiling")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
