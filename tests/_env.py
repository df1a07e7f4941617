"""What this run of the suite can exercise: imported by the test files (and conftest.py)."""

from __future__ import annotations

import torch

from fastlm import backends

# TRITON_INTERPRET=1: the Triton kernels run on the CPU, each program interpreted in Python.
INTERPRET = backends.interpreting_triton()

# The low-precision dtypes the tests sweep: bf16 dots are wrong in the Triton interpreter (a known
# upstream bug), so fp16 stands in there.
LOW = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
