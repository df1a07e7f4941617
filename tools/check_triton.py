"""Compile every Triton kernel of fastlm/kernels/ for Hopper (sm_90), no GPU needed.

    python tools/check_triton.py [FILTER]     # FILTER: substring of "name dtype" to compile

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that they
compile for the real target, for every dtype and constexpr combination the launchers use: bf16,
layouts, register pressure and the PTX/SASS back end are invisible to the interpreter. One line
per variant with its shared memory, registers and spills; a variant fails if it does not compile
or needs more shared memory than an H100/H200 block may have (MAX_SHARED: such a kernel compiles
but fails at launch). The exit status is non-zero if any variant fails.

Each fastlm/kernels/<op>.py lists its variants beside its launchers, in a `compile_specs()` function
returning fastlm.kernels._spec.Spec objects; every module of fastlm/kernels/ that defines one is compiled,
so a new op needs no edit here.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # fastlm without installing

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastlm.kernels as kernels  # noqa: E402
from fastlm.kernels._spec import Spec  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


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


def _cubin_resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, bytes of local memory) from cuobjdump -res-usage: triton's metadata fills n_regs
    and n_spills only when a kernel is loaded on a GPU."""
    import re
    import subprocess
    import tempfile

    from check_sass import cuobjdump  # tools/ is this script's directory

    tool = cuobjdump()
    if not cubin or tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    # Offline there is no ptxas report: local memory (STACK / LOCAL bytes) is where spills go.
    local = [int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", out)]
    return (int(regs.group(1)) if regs else None), (max(local) if local else 0)


def kernel_modules() -> list[str]:
    """Every module of fastlm/kernels/, in name order; those that define compile_specs() are compiled."""
    names = (m.name for m in pkgutil.iter_modules(kernels.__path__))
    return sorted(f"fastlm.kernels.{n}" for n in names if not n.startswith("_"))


def main(argv: list[str]) -> int:
    pattern = argv[1] if len(argv) > 1 else ""
    print(f"triton {triton.__version__}, target {TARGET.backend} sm_{TARGET.arch}")
    failures, done, t_start, stats = [], 0, time.time(), []
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
                shared, regs, spills = (getattr(kernel.metadata, k, None) for k in ("shared", "n_regs", "n_spills"))
                if regs is None:  # registers and spills are read when a kernel is first loaded
                    regs, spills = _cubin_resources(cubin)
                stats.append((shared or 0, spills or 0, spec.name, spec.dtype))
                verdict = "ok  " if (shared or 0) <= MAX_SHARED else "FAIL"
                print(f"{verdict}  {spec.name:<40} {spec.dtype:<4} warps={spec.num_warps:<2} "
                      f"smem={(shared or 0) / 1024:6.1f} KiB regs={regs if regs is not None else '?':>3} "
                      f"spill/local={spills if spills is not None else '?':>4} B "
                      f"ptx={len(ptx) / 1024:6.1f} KiB cubin={len(cubin) / 1024:6.1f} KiB  {time.time() - t0:5.2f} s")
                if verdict == "FAIL":
                    failures.append(f"{label} (shared memory {shared} > {MAX_SHARED} bytes)")
            except Exception as e:
                print(f"FAIL  {spec.name:<40} {spec.dtype:<4} {type(e).__name__}: {e}")
                traceback.print_exc()
                failures.append(label)
            done += 1
    print(f"{done - len(failures)}/{done} variants compiled in {time.time() - t_start:.1f} s")
    if stats:
        shared, _, name, dt = max(stats)
        print(f"largest shared memory: {shared} bytes ({shared / 1024:.1f} KiB, limit {MAX_SHARED}) in {name} {dt}")
        spilled = [f"{n} {d} ({s})" for _, s, n, d in stats if s]
        print("spills: " + (", ".join(spilled) if spilled else "none"))
    if failures:
        print("FAILED: " + ", ".join(failures), file=sys.stderr)
        return 1
    if done == 0:
        print(f"no variant matches {pattern!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
