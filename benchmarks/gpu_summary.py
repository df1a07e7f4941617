"""The pass/fail table at the end of benchmarks/gpu_check.sh, from what the run left in its folder.

    python benchmarks/gpu_summary.py OUT      # OUT: gpu_check.sh's $OUT (steps.tsv, junit-*.xml, bench-*/)
    python benchmarks/gpu_summary.py --small-cases   # one small call of every CUDA kernel (for compute-sanitizer)

Each fastlm competitor of each benchmark row is judged against a ceiling measured in the same run:

- memory-bound ops (norm, bias_gelu, embedding, decode attention, the quantized GEMV at M=1):
  GB/s over the copy bandwidth the same process measured, at least MIN_SHARE_OF_COPY of it;
- attention prefill: TFLOP/s over torch's scaled_dot_product_attention on the same inputs in the
  same run (its flash kernels on an H200), at least MIN_VS_SDPA of its rate.

The thresholds are first guesses at "nothing is badly wrong" for kernels not yet tuned on a GPU,
not targets: a FAIL says where to look first. Exit status 1 when a row fails or a step failed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Share of measured copy bandwidth (read + write) a memory-bound kernel must reach, per pass.
MIN_SHARE_OF_COPY = {
    ("norm", "fwd"): 0.50, ("norm", "bwd"): 0.35, ("norm", "fwdbwd"): 0.35,
    ("activation", "fwd"): 0.50, ("activation", "bwd"): 0.40, ("activation", "fwdbwd"): 0.40,
    ("rotary", "fwd"): 0.50, ("rotary", "bwd"): 0.50, ("rotary", "fwdbwd"): 0.50,
    ("embedding", "fwd"): 0.40, ("embedding", "bwd"): 0.20, ("embedding", "fwdbwd"): 0.20,
    ("attention", "fwd"): 0.30,  # decode: the KV cache read once
    ("quant_matmul", "fwd"): 0.40,  # GEMV: the packed weight read once
}
# Attention prefill: fastlm's rate over torch SDPA's in the same run.
MIN_VS_SDPA = {"fwd": 0.50, "bwd": 0.40, "fwdbwd": 0.40}


def _bench_docs(out: Path) -> dict[str, dict]:
    """op -> its section of the results JSON (or {"skipped": why})."""
    ops: dict[str, dict] = {}
    for path in sorted(out.glob("bench-*/*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            ops.setdefault(path.parent.name.removeprefix("bench-"), {"skipped": f"unreadable {path.name}: {e}"})
            continue
        for op, section in doc.get("ops", {}).items():
            if "rows" in section or op not in ops:
                ops[op] = section
    return ops


def judge(op: str, section: dict) -> list[tuple[str, str, str, str, str]]:
    """(verdict, case, pass, impl, detail) for every fastlm row of one op."""
    if "skipped" in section:
        return [("SKIP", "-", "-", "-", section["skipped"])]
    copy = section.get("ceiling", {}).get("copy_GBps") or float("nan")
    rows = section.get("rows", [])
    torch_rate = {(r["case"], r["pass_"]): r["rate"] for r in rows if r["impl"] == "torch"}
    lines = []
    for r in rows:
        if not r["impl"].startswith("fastlm") or op == "model":
            continue
        key = (r["case"], r["pass_"])
        if r["metric"] == "GB/s":
            if op == "quant_matmul" and "M=1 " not in r["case"]:
                continue  # larger M is compute-bound: reported by the bench's own table
            need = MIN_SHARE_OF_COPY.get((op, r["pass_"]))
            if need is None:
                continue
            share = r["rate"] / copy
            ok = share >= need
            detail = f"{r['rate']:.0f} GB/s = {100 * share:.0f}% of copy {copy:.0f} (>= {100 * need:.0f}%)"
        else:
            sdpa = torch_rate.get(key)
            need = MIN_VS_SDPA.get(r["pass_"])
            if not sdpa or need is None:
                continue
            ok = r["rate"] / sdpa >= need
            detail = f"{r['rate']:.3g} TFLOP/s = {r['rate'] / sdpa:.2f}x SDPA {sdpa:.3g} (>= {need:.2f}x)"
        lines.append(("PASS" if ok else "FAIL", r["case"], r["pass_"], r["impl"], detail))
    if not section.get("complete", True):
        lines.append(("FAIL", "-", "-", "-", "incomplete: the step stopped before its last case"))
    return lines or [("SKIP", "-", "-", "-", "no fastlm row to judge")]


def _junit(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("junit-*.xml")):
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:
            lines.append(f"{path.name}: unreadable ({e})")
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        lines.append(f"{path.name}: {n['tests']} tests, {n['failures']} failed, {n['errors']} errors, "
                     f"{n['skipped']} skipped")
        for s in suites:
            for case in s.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    lines.append(f"  FAILED {case.get('classname')}::{case.get('name')}")
    return lines


def summarize(out: Path) -> int:
    bad = False
    steps = (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []
    print("steps (name, exit status, seconds, limit):")
    for line in steps:
        name, rc, secs, lim = (line.split("\t") + ["?"] * 4)[:4]
        bad |= rc != "0"
        print(f"  {'ok  ' if rc == '0' else 'FAIL'} {name:<22} exit {rc:<4} {secs:>4}s of {lim}s")
    print("tests:")
    for line in _junit(out) or ["no JUnit file"]:
        print("  " + line)
    print("throughput against this run's own ceilings:")
    for op, section in _bench_docs(out).items():
        for verdict, case, pass_, impl, detail in judge(op, section):
            bad |= verdict == "FAIL"
            print(f"  {verdict:<4} {op:<12} {case:<34} {pass_:<6} {impl:<14} {detail}")
    return 1 if bad else 0


def small_cases() -> int:
    """One small call (forward and backward where there is one) of every CUDA kernel, each on the
    cuda and triton backends, for compute-sanitizer: it slows kernels down a hundredfold."""
    import torch

    from fastlm import ops
    from fastlm.quant import quantize

    torch.manual_seed(0)
    dev = "cuda"
    for be in ("cuda", "triton"):
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(37, 200, device=dev, dtype=dt, requires_grad=True)
            w = torch.randn(200, device=dev, dtype=dt, requires_grad=True)
            ops.layer_norm(x, (200,), w, w, backend=be).sum().backward()
            ops.rms_norm(x, (200,), w, backend=be).sum().backward()
            ops.bias_gelu(x, w, backend=be).sum().backward()
            q = torch.randn(2, 4, 77, 80, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(2, 2, 77, 80, device=dev, dtype=dt, requires_grad=True)
            ops.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True, backend=be).sum().backward()
            lens = torch.tensor([77, 5], device=dev)
            ops.decode_attention(q[:, :, :1].detach(), k.detach(), k.detach(), lens, backend=be)
            table = torch.randn(50, 72, device=dev, dtype=dt, requires_grad=True)
            ids = torch.randint(0, 50, (3, 9), device=dev)
            ops.embedding(ids, table, backend=be).sum().backward()
            ops.token_position_embedding(ids, table, table, 2, backend=be).sum().backward()
            lin = torch.randn(96, 256, device=dev, dtype=dt)
            for bits in (8, 4):
                ops.quant_linear(torch.randn(3, 256, device=dev, dtype=dt), quantize(lin, bits, 128), backend=be)
        torch.cuda.synchronize()
        print(f"small cases on {be}: ok")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--small-cases"]:
        sys.exit(small_cases())
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(summarize(Path(sys.argv[1])))
