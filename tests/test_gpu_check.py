"""benchmarks/gpu_check.sh in its dry mode (no GPU steps): the one GPU run a session may get must not
be the first run of the script, so everything but the GPU itself is exercised here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fastlm.bench import OPS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_writes_every_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DRY": "1", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=150)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    for name in ("junit-first.xml", "junit-rest.xml"):
        ET.parse(tmp_path / name)  # written, and well-formed
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["tests-first", "tests-rest"] and all(s[1] == "0" for s in steps), steps
    for op in OPS:
        doc = json.loads((tmp_path / f"bench-{op}" / "skipped.json").read_text())
        assert doc["ops"][op]["skipped"] == "skipped: no GPU"
    summary = (tmp_path / "summary.txt").read_text()
    assert "junit-first.xml" in summary and "SKIP" in summary, summary
    assert (tmp_path / "gpu_check.log").read_text().count("--- tests-first: exit 0") == 1


def test_summary_judges_rows_against_this_runs_ceilings(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)

    def row(case, impl, pass_, rate, metric="GB/s"):
        return {"case": case, "impl": impl, "pass_": pass_, "rate": rate, "metric": metric}

    norm = {"ceiling": {"copy_GBps": 4000.0}, "complete": True,
            "rows": [row("layer_norm 8x8", "fastlm-cuda", "fwd", 3000.0), row("layer_norm 8x8", "torch", "fwd", 1.0),
                     row("layer_norm 8x8", "fastlm-triton", "fwd", 1000.0)]}
    assert [v[0] for v in gpu_summary.judge("norm", norm)] == ["PASS", "FAIL"]
    attn = {"ceiling": {"copy_GBps": 4000.0}, "complete": False,
            "rows": [row("causal x", "torch", "fwd", 400.0, "TFLOP/s"), row("causal x", "fastlm-cuda", "fwd", 300.0,
                                                                            "TFLOP/s")]}
    assert [v[0] for v in gpu_summary.judge("attention", attn)] == ["PASS", "FAIL"]  # the FAIL: incomplete
    gemv = {"ceiling": {"copy_GBps": 4000.0}, "rows": [row("int8 M=1 (4.0x)", "fastlm-triton", "fwd", 100.0),
                                                      row("int8 M=64 (4.0x)", "fastlm-triton", "fwd", 1.0)]}
    assert [v[0] for v in gpu_summary.judge("quant_matmul", gemv)] == ["FAIL"]
    (tmp_path / "bench-norm").mkdir()
    (tmp_path / "bench-norm" / "m.json").write_text(json.dumps({"ops": {"norm": norm}}))
    (tmp_path / "steps.tsv").write_text("build-cuda\t0\t90\t240\n")
    assert gpu_summary.summarize(tmp_path) == 1  # fastlm-triton's norm fails
