"""Choosing a backend: the argument, use_backend, FASTLM_BACKEND, and errors that say why."""

import os
import subprocess
import sys

import pytest
import torch
from _env import INTERPRET

import fastlm
from fastlm import backends


def test_torch_is_always_available():
    assert backends.why_unavailable("torch", "cpu") is None
    assert "torch" in backends.available("cpu")


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(fastlm.BackendUnavailable, match="unknown backend 'fast'.*torch, cpu, cuda, triton"):
        backends.choose("layer_norm", torch.device("cpu"), "fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastlm.use_backend("fast"):
            pass


def test_backend_for_another_device_says_why():
    with pytest.raises(fastlm.BackendUnavailable, match="backend 'cuda' runs on CUDA tensors"):
        fastlm.ops.layer_norm(torch.randn(2, 4), (4,), backend="cuda")


@pytest.mark.skipif(INTERPRET, reason="triton runs on the CPU here")
def test_triton_on_cpu_needs_the_interpreter():
    with pytest.raises(fastlm.BackendUnavailable, match="TRITON_INTERPRET=1"):
        fastlm.ops.rms_norm(torch.randn(2, 4), (4,), backend="triton")


def test_use_backend_nests_and_restores():
    dev = torch.device("cpu")
    auto = backends.choose("x", dev)
    with fastlm.use_backend("torch"):
        assert backends.choose("x", dev) == "torch"
        with fastlm.use_backend(None):
            assert backends.choose("x", dev) == auto
        assert backends.choose("x", dev) == "torch"
        assert backends.choose("x", dev, "torch") == "torch"  # the argument wins
    assert backends.choose("x", dev) == auto


def test_auto_prefers_compiled_kernels_on_cpu():
    expected = "cpu" if backends.why_unavailable("cpu", "cpu") is None else "torch"
    assert backends.choose("x", torch.device("cpu")) == expected


def test_environment_variable_sets_the_default():
    code = "import torch, fastlm; print(fastlm.backends.choose('x', torch.device('cpu')))"
    env = {**os.environ, "FASTLM_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"
    env["FASTLM_BACKEND"] = "cuda"
    code = "import torch, fastlm; fastlm.ops.layer_norm(torch.randn(2, 4), (4,))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "backend 'cuda' is not available" in out.stderr


def test_extension_missing_falls_back_to_torch(tmp_path):
    # A fresh interpreter that cannot find fastlm._C (nor a `fastlm build` of it: an empty cache)
    # still imports fastlm and uses torch.
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'fastlm._C' else real(n, *a)\n"
        "import torch, fastlm\n"
        "from fastlm.info import report\n"
        "print(fastlm.backends.choose('x', torch.device('cpu')))\n"
        "print(fastlm.ops.layer_norm(torch.ones(2, 4), (4,)).abs().sum().item())\n"
        "print(report())\n"
    )
    env = {**os.environ, "FASTLM_CACHE": str(tmp_path), "FASTLM_BACKEND": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    lines = out.stdout.splitlines()
    assert lines[0] == "torch" and float(lines[1]) == 0.0
    assert "fastlm._C was not built" in out.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_kernels_run_on_their_tensors_device(name):
    """Tensors on cuda:1 while cuda:0 is current: every launch must follow the tensors."""
    if backends.why_unavailable(name, "cuda") is not None:
        pytest.skip(backends.why_unavailable(name, "cuda"))
    x = torch.randn(33, 256, device="cuda:1")
    w, b = torch.randn(256, device="cuda:1"), torch.randn(256, device="cuda:1")
    with torch.cuda.device(0):
        y = fastlm.ops.layer_norm(x, (256,), w, b, backend=name)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (256,), w, b), rtol=1e-5, atol=1e-5)


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """A library built for another torch is never loaded (it would crash or compute garbage): ops run
    on the torch path, the first call warns once with the reason and the fix, and info says it."""
    code = (
        "import warnings, torch\n"
        "from fastlm import _build\n"
        "_build.read_info = lambda d: {'torch': '0.0.0'}\n"
        "import fastlm\n"
        "from fastlm import backends\n"
        "err = backends.extension_error()\n"
        "assert 'built for torch 0.0.0' in err and 'fastlm build' in err, err\n"
        "x = torch.randn(3, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = [fastlm.ops.layer_norm(x, (8,)) for _ in range(3)][-1]\n"
        "torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))\n"
        "msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]\n"
        "assert len(msgs) == 1 and 'fastlm build' in msgs[0], msgs\n"
        "from fastlm.info import report\n"
        "assert 'built for torch 0.0.0' in report()\n"
    )
    env = {**os.environ, "FASTLM_CACHE": str(tmp_path), "FASTLM_BACKEND": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
