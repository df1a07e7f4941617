"""One compile variant of a Triton kernel, as tools/check_triton.py compiles it for sm_90.

Each kernels/<op>.py lists its variants in a `compile_specs()` function beside the launchers whose
choices (tiles, warps, flags) they restate; the checker finds every module that defines one. Plain
data only: building a list needs neither a GPU nor the compiler, so it works under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SPEC_DTYPES = ("fp16", "bf16", "fp32")  # the storage dtypes every op is compiled for


@dataclass
class Spec:
    """One compiled variant: the kernel, its runtime argument types, its constexpr values.

    signature maps every non-constexpr argument name to a Triton type ("*fp16", "i32", "fp32"...);
    constexprs maps the tl.constexpr argument names to values.
    """

    name: str
    dtype: str  # the storage dtype this variant is for, as printed
    fn: object  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    # Integer arguments to mark divisible by 16, as a launch marks e.g. D = 768: the row stride then
    # proves rows 16-byte aligned, which is what lets the compiler vectorise row loads.
    divisible: tuple[str, ...] = ()
    # Shared memory grows with the pipeline depth, so compile at the depth the launcher uses.
    num_stages: int = 3
