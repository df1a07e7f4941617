"""pytest-benchmark suite for bias_gelu: the same cases as `fastlm bench --op activation`.

    pytest benchmarks/bench_activation.py --benchmark-group-by=param:case

Each case's competitors (fastlm backends, torch eager, torch.compile) run side by side; the
report's "ops" column is calls per second. For GB/s and the share of copy bandwidth, use
`fastlm bench --op activation`.
"""

import pytest
import torch

from fastlm.bench import activation, harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {c.name: c for c in activation.cases(DEVICE, quick=False)}
PARAMS = [(c, impl, p) for c in CASES for impl in CASES[c].impls for p in harness.PASSES]


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=["/".join(p) for p in PARAMS])
def test_activation(benchmark, case, impl, pass_):
    harness.pytest_benchmark(benchmark, CASES[case], impl, pass_, DEVICE)
