"""Argument checks shared by the ops: each raises an exception that names the argument."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What each compiled backend computes in; the torch backend takes whatever torch does.
BACKEND_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}


def tensor(op: str, name: str, t, *, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def real(op: str, name: str, v) -> None:
    """`v` is a real number (int, float, a NumPy scalar; not a bool)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__} {v!r}")


def integer(op: str, name: str, v) -> None:
    """`v` is an integer (int, a NumPy integer; not a bool, and not a float such as 2.0)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__} {v!r}")


def like(op: str, name: str, t, ref: torch.Tensor, ref_name: str, shape=None, same_dtype=True) -> None:
    """`t` is a tensor on ref's device, with ref's dtype unless not `same_dtype`, and `shape`."""
    tensor(op, name, t)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def backend_dtype(op: str, backend: str, t: torch.Tensor, dtypes: dict = BACKEND_DTYPES) -> None:
    """`t`'s dtype is one that `backend` computes in (by `dtypes`, for an op whose kernels differ)."""
    allowed = dtypes.get(backend)
    if allowed is not None and t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: backend {backend!r} supports input dtypes {names}; input has dtype {t.dtype}")
