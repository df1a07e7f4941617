"""Which (backend, device) pairs the tests run on here.

Tests that take the `backend` fixture run once per backend available on each device present:
on this CPU "torch" and "cpu"; with TRITON_INTERPRET=1 only "triton" (the Triton suite, run as a
separate pytest process because the variable must be set before triton is imported); on a GPU
machine "torch", "cuda" and "triton" on CUDA tensors as well. The `device` fixture follows the
backend. Tests marked `triton` are selected with -m triton; `gpu` marks what a GPU machine must
run (the cuda and triton backends on CUDA tensors, and tests marked gpu by hand, which skip
without CUDA): benchmarks/gpu_check.sh runs -m gpu, not the CPU tests it would repeat.
"""

from __future__ import annotations

import pytest
import torch
from _env import INTERPRET

from fastlm import backends


def backend_params() -> list[tuple[str, str]]:
    if INTERPRET:
        return [("triton", "cpu")] if backends.why_unavailable("triton", "cpu") is None else []
    pairs = [(b, "cpu") for b in ("torch", "cpu") if backends.why_unavailable(b, "cpu") is None]
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in ("torch", "cuda", "triton") if backends.why_unavailable(b, "cuda") is None]
    return pairs


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        pairs = backend_params()
        metafunc.parametrize(
            "backend,device",
            pairs,
            ids=[f"{b}-{d}" for b, d in pairs],
        )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on a CUDA device (benchmarks/gpu_check.sh selects -m gpu)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.triton)
        if callspec is not None and callspec.params.get("device") == "cuda" and \
                callspec.params.get("backend") in ("cuda", "triton"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread: the tiny models of the model and trainer tests gain
    nothing from a second one, and on a busy machine OpenMP threads waiting on each other cost
    more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
