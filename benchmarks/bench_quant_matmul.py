"""pytest-benchmark suite for the weight-only quantized linear: the same cases as
`fastlm bench --op quant_matmul`.

    pytest benchmarks/bench_quant_matmul.py --benchmark-group-by=param:case

Each case's competitors (fastlm backends, the dense float matmul as "torch", torch's own int8 and
int4 weight-only kernels where this torch has them) run side by side, forward only; the report's
"ops" column is calls per second. For GB/s, the speedup over the dense matmul and the ideal one,
use `fastlm bench --op quant_matmul`.
"""

import pytest
import torch

from fastlm.bench import harness, quant_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {c.name: c for c in quant_matmul.cases(DEVICE, quick=False)}
PARAMS = [(c, impl, p) for c in CASES for impl in CASES[c].impls for p in CASES[c].passes]


@pytest.mark.parametrize("case,impl,pass_", PARAMS, ids=["/".join(p) for p in PARAMS])
def test_quant_matmul(benchmark, case, impl, pass_):
    harness.pytest_benchmark(benchmark, CASES[case], impl, pass_, DEVICE)
