"""pytest-benchmark suite for embedding: the same cases as `fastlm bench --op embedding`.

    pytest benchmarks/bench_embedding.py --benchmark-group-by=param:case
"""

import pytest
import torch

from fastlm.bench import embedding, harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {c.name: c for c in embedding.cases(DEVICE, quick=False)}
PARAMS = [(c, impl, p) for c in CASES for impl in CASES[c].impls for p in harness.PASSES]


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=["/".join(p) for p in PARAMS])
def test_embedding(benchmark, case, impl, pass_):
    harness.pytest_benchmark(benchmark, CASES[case], impl, pass_, DEVICE)
