"""Compile every Triton kernel of kernels/ for Hopper (sm_90), no GPU needed.

    python tools/check_triton.py [FILTER]     # FILTER: substring of "name dtype" to compile

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that they
compile for the real target, for every dtype and constexpr combination the launchers use: bf16,
layouts, register pressure and the PTX/SASS back end are invisible to the interpreter. One line
per variant; the exit status is non-zero if any variant fails.

Each kernels/<op>.py lists its variants beside its launchers, in a `compile_specs()` function returning
kernels._spec.Spec objects; every module of kernels/ that defines one is compiled, so a new op needs no
edit here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

# The interpreter replaces @triton.jit kernels by Python ones that cannot be compiled; it must be
# off before triton is imported. FP fusion is Triton's default anyway; setting it silences a warning.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kernels` without installing

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kernels  # noqa: E402
from kernels._spec import Spec  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200


def compile_spec(spec: Spec):
    # ASTSource (same format in triton 3.6 and 3.9) wants constexpr arguments in the signature too,
    # typed "constexpr", with their values in a separate dict keyed by name.
    signature = {name: spec.signature.get(name, "constexpr") for name in spec.fn.arg_names}
    unknown = (set(spec.signature) | set(spec.constexprs) | set(spec.divisible)) - set(spec.fn.arg_names)
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in spec.constexprs]
    if unknown or missing:
        raise ValueError(f"spec does not match the kernel: unknown {sorted(unknown)}, missing {missing}")
    # A real launch marks 16-byte-aligned pointers (every torch allocation) divisible by 16, which
    # enables vectorised loads; mark them here too so that the same code is compiled.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(spec.fn.arg_names)
        if signature[name].startswith("*") or name in spec.divisible
    }
    src = ASTSource(spec.fn, signature, spec.constexprs, attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def kernel_modules() -> list[str]:
    """Every module of kernels/, in name order; those that define compile_specs() are compiled."""
    return sorted(f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    pattern = argv[1] if len(argv) > 1 else ""
    print(f"triton {triton.__version__}, target {TARGET.backend} sm_{TARGET.arch}")
    failures, done, t_start = [], 0, time.time()
    for name in kernel_modules():
        # An import that fails is reported like a variant that fails, and the other ops still run.
        try:
            build = getattr(importlib.import_module(name), "compile_specs", None)
            specs = build() if build is not None else []
        except Exception:
            traceback.print_exc()
            failures.append(f"{name}.compile_specs")
            continue
        for spec in specs:
            label = f"{spec.name} {spec.dtype}"
            if pattern not in label:
                continue
            t0 = time.time()
            try:
                kernel = compile_spec(spec)
                ptx, cubin = kernel.asm["ptx"], kernel.asm.get("cubin", b"")
                print(f"ok    {spec.name:<40} {spec.dtype:<4} warps={spec.num_warps:<2} "
                      f"ptx={len(ptx) / 1024:6.1f} KiB cubin={len(cubin) / 1024:6.1f} KiB  "
                      f"{time.time() - t0:5.2f} s")
            except Exception as e:
                print(f"FAIL  {spec.name:<40} {spec.dtype:<4} {type(e).__name__}: {e}")
                traceback.print_exc()
                failures.append(label)
            done += 1
    print(f"{done - len(failures)}/{done} variants compiled in {time.time() - t_start:.1f} s")
    if failures:
        print("FAILED: " + ", ".join(failures), file=sys.stderr)
        return 1
    if done == 0:
        print(f"no variant matches {pattern!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
