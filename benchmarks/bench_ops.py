"""pytest-benchmark suite of every op's cases: the same cases as `fastlm bench`.

    pytest benchmarks/bench_ops.py --benchmark-group-by=param:op,param:case
    FASTLM_BENCH_OPS=norm pytest benchmarks/bench_ops.py --benchmark-group-by=param:case   # one op's

Each case's competitors (fastlm backends, torch eager, torch.compile, and an op's own others,
such as torch's int8/int4 weight-only kernels for quant_matmul) run side by side; the report's
"ops" column is calls per second. For GB/s or FLOP/s, the share of the machine's measured ceiling
and the speedups, use `fastlm bench --op OP`. FASTLM_BENCH_OPS (comma-separated) limits the ops
whose cases are built; all of them take about half a minute to collect (quant_matmul's weights).
"""

import importlib
import os

import pytest
import torch

from fastlm.bench import OPS, harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SELECTED = [op for op in os.environ.get("FASTLM_BENCH_OPS", ",".join(OPS)).split(",") if op]
if unknown := sorted(set(SELECTED) - set(OPS)):
    raise ValueError(f"FASTLM_BENCH_OPS: unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
CASES = {
    (op, c.name): c
    for op in SELECTED
    for c in importlib.import_module(f"fastlm.bench.{op}").cases(DEVICE, quick=False)
}
PARAMS = [(op, name, impl, p) for (op, name), c in CASES.items() for impl in c.impls for p in c.passes]


@pytest.mark.parametrize("op,case,impl,pass_", PARAMS, ids=["/".join(p) for p in PARAMS])
def test_op(benchmark, op, case, impl, pass_):
    harness.pytest_benchmark(benchmark, CASES[op, case], impl, pass_, DEVICE)
