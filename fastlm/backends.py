"""Which backends exist here, and which one runs a call.

Backends:
    "torch"   the reference PyTorch path (always available)
    "cpu"     C++ kernels in fastlm._C, for CPU tensors
    "cuda"    CUDA C++ kernels in fastlm._C, for CUDA tensors
    "triton"  Triton kernels, for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)

A call picks its backend from, in order: the `backend=` argument, the innermost
`fastlm.use_backend(...)` block, the FASTLM_BACKEND environment variable, and otherwise the
fastest one available for the input's device. Asking for a backend that cannot run the call
raises BackendUnavailable with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import platform
import warnings
from pathlib import Path

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")

# Preference when nothing is asked for. On a GPU, Triton leads until the CUDA C++ kernels have
# been measured against it on a real device.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


# --- the compiled extension -------------------------------------------------------------------

_C_ERROR: str | None = None
_C_PATH: str | None = None   # the library that was loaded
_C_INFO: dict | None = None  # its build record (torch version, CUDA kernels and why)
# The instructions AVX2 builds use; a CPU without them would die on an illegal instruction.
_NEEDED_CPU_FLAGS = ("avx2", "fma", "f16c")


def _missing_cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return []
    return [] if flags is None else [f for f in _NEEDED_CPU_FLAGS if f not in flags]


def _candidates(fb) -> list[tuple[str, dict | None]]:
    """(library, its build record) for the build made at install, then one from `fastlm build`."""
    found = []
    spec = importlib.util.find_spec("fastlm._C")
    if spec is not None and spec.origin is not None:
        found.append((spec.origin, fb.read_info(Path(spec.origin).parent)))
    try:
        cached = fb.cache_dir()
    except FileNotFoundError:  # the sources are not installed: nothing could have been built
        return found
    for lib in cached.glob("fastlm_C*.so"):
        found.append((str(lib), fb.read_info(cached)))
    return found


@functools.cache
def _load_extension() -> bool:
    """Load fastlm._C (it registers torch.ops.fastlm_C.*), if one was built for the running torch.
    Failure is recorded with the command that fixes it, not raised: every op then runs on torch."""
    global _C_ERROR, _C_PATH, _C_INFO
    from fastlm import _build as fb

    fix = f"run `fastlm build` to compile it for torch {torch.__version__} (a few minutes)"
    if platform.machine() in ("x86_64", "AMD64") and (missing := _missing_cpu_flags()):
        _C_ERROR = f"this CPU lacks {', '.join(missing)}, which fastlm._C's kernels need"
        return False
    reasons = []
    for lib, info in _candidates(fb):
        if info is not None and info.get("torch") != torch.__version__:
            reasons.append(f"{lib} was built for torch {info.get('torch')}")
            continue
        try:
            torch.ops.load_library(lib)
        except (OSError, RuntimeError) as e:
            reasons.append(f"{lib} failed to load ({e})")
            continue
        _C_PATH, _C_INFO = lib, info
        return True
    _C_ERROR = f"{'; '.join(reasons) or 'fastlm._C was not built'}: {fix}"
    return False


def extension_info() -> tuple[str | None, dict | None]:
    """(path, build record) of the loaded extension, or (None, None)."""
    _load_extension()
    return _C_PATH, _C_INFO


def extension_error() -> str | None:
    _load_extension()
    return _C_ERROR


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlm_C::{op}", dispatch_key)


def quant_isa() -> str | None:
    """The instruction set the CPU's integer quantized matmul runs (None without the extension)."""
    if extension_error():
        return None
    return torch.ops.fastlm_C.quant_dot_isa(-1)


def extension_has_cuda() -> bool:
    """Whether fastlm._C was built with its CUDA kernels (whether or not a GPU is present)."""
    return _load_extension() and _has_kernel("norm_fwd", "CUDA")


@functools.cache
def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --- availability -----------------------------------------------------------------------------


# torch.compile calls this at trace time and keeps the answer as a constant: what is built and
# installed does not change within a process, and tracing into the import machinery would break
# the graph.
@torch.compiler.assume_constant_result
def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run ops on tensors of `device_type`; otherwise the reason."""
    return _why_unavailable(backend, device_type)


@functools.cache
def _why_unavailable(backend: str, device_type: str) -> str | None:
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, not {device_type} tensors"
        if not _load_extension():
            return _C_ERROR
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, not {device_type} tensors"
        if not _load_extension():
            return _C_ERROR
        if not extension_has_cuda():
            return "fastlm._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)"
        return None
    # triton
    if (err := _triton_error()) is not None:
        return err
    if device_type == "cuda":
        return None
    if device_type == "cpu" and interpreting_triton():
        return None
    if device_type == "cpu":
        return "backend 'triton' runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set)"
    return f"backend 'triton' does not run on {device_type} tensors"


def available(device_type: str) -> list[str]:
    return [b for b in BACKENDS if why_unavailable(b, device_type) is None]


# --- choosing ----------------------------------------------------------------------------------

# A plain module-level stack rather than a ContextVar: torch.compile traces through the choice and
# guards on plain globals, whereas ContextVar reads break the graph. It is therefore process-wide,
# not per thread.
_STACK: list[str] = []
_ENV_BACKEND = os.environ.get("FASTLM_BACKEND") or None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run fastlm ops inside the block on backend `name` (None restores automatic choice)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _STACK.append(name)
    try:
        yield
    finally:
        _STACK.pop()


def requested_backend() -> str | None:
    if _STACK:
        return _STACK[-1]
    return _ENV_BACKEND


def choose(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs `op` on `device`: the one asked for, or the best available."""
    asked = backend if backend is not None else requested_backend()
    dtype = device.type
    if asked is not None:
        reason = why_unavailable(asked, dtype)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend {asked!r} is not available: {reason}")
        return asked
    for name in AUTO_ORDER.get(dtype, ("torch",)):
        if why_unavailable(name, dtype) is None:
            return name
        if name in ("cpu", "cuda") and not torch.compiler.is_compiling():
            _warn_fallback(name)
    return "torch"


@functools.cache
def _warn_fallback(backend: str) -> None:
    """Once per backend: the compiled kernels were wanted but cannot run, so torch's path does."""
    warnings.warn(f"fastlm: backend {backend!r} is not available ({_why_unavailable(backend, backend)}); "
                  f"ops run on the torch reference path", RuntimeWarning, stacklevel=3)
