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

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")

# Preference when nothing is asked for. On a GPU, Triton leads until the CUDA C++ kernels have
# been measured against it on a real device.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


# --- the compiled extension -------------------------------------------------------------------

_C_ERROR: str | None = None


@functools.cache
def _load_extension() -> bool:
    """Load fastlm._C (it registers torch.ops.fastlm_C.*). Failure is recorded, not raised."""
    global _C_ERROR
    spec = importlib.util.find_spec("fastlm._C")
    if spec is None or spec.origin is None:
        _C_ERROR = "fastlm._C was not built (reinstall with `pip install -e . --no-build-isolation`)"
        return False
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as e:
        _C_ERROR = f"fastlm._C failed to load: {e}"
        return False
    return True


def extension_error() -> str | None:
    _load_extension()
    return _C_ERROR


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlm_C::{op}", dispatch_key)


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
    return "torch"
