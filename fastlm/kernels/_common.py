"""What every launcher shares: the argument check that names its module, and the SM count."""

from __future__ import annotations

import functools

import torch


def checker(module: str):
    """check(cond, msg): ValueError "fastlm.kernels.<module>: msg" unless cond. The ops layer has
    validated user input already; this guards direct callers of the launchers."""

    def check(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"fastlm.kernels.{module}: {msg}")

    return check


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (asked once: the query costs microseconds)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
