"""Compile every Triton kernel of kernels/ for Hopper (sm_90), no GPU needed.

    python tools/check_triton.py [FILTER]     # FILTER: substring of "name dtype" to compile

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that they
compile for the real target, for every dtype and constexpr combination the launchers use: bf16,
layouts, register pressure and the PTX/SASS back end are invisible to the interpreter. One line
per variant; the exit status is non-zero if any variant fails.

To add an op: write a `<op>_specs()` function returning Spec objects and list it in SPEC_BUILDERS.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# The interpreter replaces @triton.jit kernels by Python ones that cannot be compiled; it must be
# off before triton is imported. FP fusion is Triton's default anyway; setting it silences a warning.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `kernels` without installing

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class Spec:
    """One compiled variant: the kernel, its runtime argument types, its constexpr values.

    signature maps every non-constexpr argument name to a Triton type ("*fp16", "i32", "fp32"...);
    constexprs maps the tl.constexpr argument names to values.
    """

    name: str
    dtype: str  # the storage dtype this variant is for, as printed
    fn: triton.runtime.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    # Integer arguments to mark divisible by 16, as a launch marks e.g. D = 768: the row stride then
    # proves rows 16-byte aligned, which is what lets the compiler vectorise row loads.
    divisible: tuple[str, ...] = ()


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
    return triton.compile(src, target=TARGET, options={"num_warps": spec.num_warps})


# ---------------------------------------------------------------------------------------------
# Per-op variant lists


def norm_specs() -> list[Spec]:
    from kernels import norm

    specs = []
    # (HAS_W, HAS_B, RMS): every affine combination the ops layer can ask for.
    flag_sets = [(w, b, False) for w, b in ((0, 0), (1, 0), (1, 1))] + [(w, 0, True) for w in (0, 1)]
    block_ns = (1024, 8192, norm.MAX_N)
    for dt in DTYPES:
        for block_n in block_ns:
            warps = norm._num_warps(block_n)
            # The full flag matrix at a typical width; the wide rows (register pressure) with all flags.
            flags = flag_sets if block_n == 1024 else [(1, 1, False), (1, 0, True)]
            for has_w, has_b, rms in flags:
                for extra in (False, True):  # residual in the forward, dh in the backward
                    tag = f"{'rms' if rms else 'ln'}{',w' if has_w else ''}{',b' if has_b else ''}"
                    specs.append(Spec(
                        f"norm_fwd[{tag}{',res' if extra else ''},N={block_n}]", dt,
                        norm._norm_fwd_kernel,
                        {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "R": f"*{dt}", "Y": f"*{dt}",
                         "H": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32", "N": "i32", "eps": "fp32"},
                        {"HAS_W": bool(has_w), "HAS_B": bool(has_b), "HAS_RES": extra, "RMS": rms,
                         "BLOCK_N": block_n},
                        warps,
                    ))
                    specs.append(Spec(
                        f"norm_bwd[{tag}{',dh' if extra else ''},N={block_n}]", dt,
                        norm._norm_bwd_kernel,
                        {"DY": f"*{dt}", "X": f"*{dt}", "W": f"*{dt}", "Mean": "*fp32", "Rstd": "*fp32",
                         "DH": f"*{dt}", "DX": f"*{dt}", "DW_part": "*fp32", "DB_part": "*fp32",
                         "M": "i32", "N": "i32", "rows_per_program": "i32"},
                        {"HAS_W": bool(has_w), "HAS_B": bool(has_b), "HAS_DH": extra, "RMS": rms,
                         "BLOCK_N": block_n},
                        warps,
                    ))
        specs.append(Spec(
            "norm_col_sum", dt,
            norm._col_sum_kernel,
            {"P": "*fp32", "Out": f"*{dt}", "num_rows": "i32", "N": "i32"},
            {"BLOCK_ROWS": norm.COL_SUM_BLOCK_ROWS, "BLOCK_COLS": norm.COL_SUM_BLOCK_COLS},
        ))
    return specs


def embedding_specs() -> list[Spec]:
    from kernels import embedding

    specs = []
    size = {"fp16": 2, "bf16": 2, "fp32": 4}
    for dt in DTYPES:
        # (D, ids types, HAS_POS values, D divisible by 16): a narrow table, the typical width in
        # every flag combination, the widest column block, and an unaligned width (no vector loads).
        fwd_cases = [(64, ("i64",), (False, True), True), (768, ("i32", "i64"), (False, True), True),
                     (8192, ("i64",), (False, True), True), (7, ("i64",), (False,), False)]
        for D, id_types, pos_flags, aligned in fwd_cases:
            block_r, block_d, warps = embedding._tile(D, size[dt], 1 << 20, True)
            for it in id_types:
                for has_pos in pos_flags:
                    sig = {"Ids": f"*{it}", "W": f"*{dt}", "Pos": f"*{dt}", "Out": f"*{dt}", "Bad": "*i64",
                           "n": "i32", "V": "i32", "D": "i32", "start_pos": "i32"}
                    consts = {"HAS_POS": has_pos, "BLOCK_R": block_r, "BLOCK_D": block_d}
                    if has_pos:
                        sig["T"] = "i32"
                    else:
                        consts["T"] = 1  # the launcher passes T = 1, which a launch specialises
                    specs.append(Spec(
                        f"embedding_fwd[{'tok+pos' if has_pos else 'tok'},{it},D={D}]", dt,
                        embedding._embedding_fwd_kernel, sig, consts, warps,
                        ("D", "start_pos") if aligned else ("start_pos",),
                    ))
        for D, id_types, aligned in ((64, ("i64",), True), (768, ("i32", "i64"), True), (8192, ("i64",), True),
                                     (7, ("i64",), False)):
            block_r, block_d, warps = embedding._tile(D, size[dt], 1 << 20, True)
            for it in id_types:
                specs.append(Spec(
                    f"embedding_bwd_atomic[{it},D={D}]", dt,
                    embedding._embedding_bwd_atomic_kernel,
                    {"DOut": f"*{dt}", "Ids": f"*{it}", "DW": "*fp32",
                     "n": "i32", "V": "i32", "D": "i32", "padding_idx": "i32"},
                    {"BLOCK_R": block_r, "BLOCK_D": block_d}, warps, ("D",) if aligned else (),
                ))
        for D, id_types, aligned in ((64, ("i64",), True), (768, ("i32", "i64"), True), (7, ("i64",), False)):
            block_r, block_d, warps = embedding._tile(
                D, 4, 1 << 20, True, embedding.SORTED_MAX_BLOCK_D, embedding.SORTED_BLOCK_R)
            for it in id_types:
                specs.append(Spec(
                    f"embedding_bwd_sorted[{it},D={D}]", dt,
                    embedding._embedding_bwd_sorted_kernel,
                    {"DOut": f"*{dt}", "SortedIds": f"*{it}", "Perm": "*i64", "RunEnd": "*i64", "DW": f"*{dt}",
                     "V": "i32", "D": "i32", "padding_idx": "i32"},
                    {"BLOCK_R": block_r, "BLOCK_D": block_d}, warps, ("D",) if aligned else (),
                ))
    return specs


SPEC_BUILDERS = [norm_specs, embedding_specs]  # attention_specs, quant_matmul_specs, ... go here


def main(argv: list[str]) -> int:
    pattern = argv[1] if len(argv) > 1 else ""
    print(f"triton {triton.__version__}, target {TARGET.backend} sm_{TARGET.arch}")
    failures, done, t_start = [], 0, time.time()
    for build in SPEC_BUILDERS:
        try:
            specs = build()
        except Exception:
            traceback.print_exc()
            failures.append(build.__name__)
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
