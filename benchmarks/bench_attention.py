"""pytest-benchmark suite for attention and decoding: the same cases as `fastlm bench --op attention`.

    pytest benchmarks/bench_attention.py --benchmark-group-by=param:case

Each case's competitors (fastlm backends, torch eager, torch.compile) run side by side; the
report's "ops" column is calls per second. For FLOP/s, the share of the matmul rate and peak
memory, use `fastlm bench --op attention`.
"""

import pytest
import torch

from fastlm.bench import attention, harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {c.name: c for c in attention.cases(DEVICE, quick=False)}
PARAMS = [(c, impl, p) for c in CASES for impl in CASES[c].impls for p in CASES[c].passes]


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=["/".join(p) for p in PARAMS])
def test_attention(benchmark, case, impl, pass_):
    harness.pytest_benchmark(benchmark, CASES[case], impl, pass_, DEVICE)
