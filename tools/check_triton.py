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
    # Shared memory grows with the pipeline depth, so compile at the depth the launcher uses.
    num_stages: int = 3


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


def attention_specs() -> list[Spec]:
    import torch

    from kernels import attention

    torch_dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    # (dtype, D, IS_CAUSAL, HAS_MASK, G, backward too). G = 1 is what an MHA launch specialises;
    # None: GQA, G passed as an integer. Every dtype at the fast head dims, the mask and GQA paths,
    # an odd head dim (padded BLOCK_D, masked columns) and the widest.
    cases = [(dt, D, True, False, 1 if D == 64 else None, True) for dt in DTYPES for D in (64, 128)]
    cases += [("fp16", 128, False, True, 1, True), ("bf16", 128, False, True, 1, False),
              ("bf16", 64, True, True, None, True), ("fp32", 64, False, True, 1, False),
              ("fp16", 80, True, True, None, True), ("fp16", 256, True, False, 1, False),
              ("bf16", 256, False, True, None, False), ("bf16", 256, True, False, 1, True)]
    specs = []
    for dt, D, causal, has_mask, G, with_bwd in cases:
        tdt = torch_dt[dt]
        block_d = attention._block_d(D)
        pad = block_d != D
        bm, bn, warps, st = attention.fwd_config(block_d, tdt, True, has_mask)
        (bm1, bn1, w1, st1), (bm2, bn2, w2, st2) = attention.bwd_config(block_d, tdt, True, has_mask)
        tag = f"{'causal' if causal else 'full'}{',mask' if has_mask else ''}{',gqa' if G is None else ''},D={D}"
        flags = {"IS_CAUSAL": causal, "HAS_MASK": has_mask, "PAD_D": pad, "UPCAST": False,
                 "PREC": "ieee" if dt == "fp32" else "tf32", "WHILE_LOOPS": False, "BLOCK_D": block_d}
        ints = {"Hq": "i32", "Tq": "i32", "Tk": "i32", "D": "i32", "stride_mb": "i32", "stride_mh": "i32",
                "stride_mm": "i32"}
        if G is None:
            ints["G"] = "i32"
        else:
            flags["G"] = G
        if has_mask:
            flags["stride_mn"] = 1  # a row-contiguous bias: a launch specialises the 1
        else:
            ints["stride_mn"] = "i32"
        div = ("Tq", "Tk") if pad else ("Tq", "Tk", "D")  # T a multiple of 16, as training shapes are
        specs.append(Spec(
            f"attn_fwd[{tag}]", dt, attention._attn_fwd_kernel,
            {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Mask": "*fp32", "Out": f"*{dt}", "Lse": "*fp32",
             "num_m_blocks": "i32", "qk_scale": "fp32", **ints},
            {**flags, "BLOCK_M": bm, "BLOCK_N": bn}, warps, div, num_stages=st,
        ))
        if with_bwd:
            bwd_sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Mask": "*fp32", "DO": f"*{dt}",
                       "Lse": "*fp32", "Delta": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32", **ints}
            specs.append(Spec(
                f"attn_bwd_dkdv[{tag}]", dt, attention._attn_bwd_dkdv_kernel,
                {**bwd_sig, "DK": f"*{dt}", "DV": f"*{dt}", "num_n_blocks": "i32"},
                {**flags, "BLOCK_M": bm1, "BLOCK_N": bn1}, w1, div, num_stages=st1,
            ))
            specs.append(Spec(
                f"attn_bwd_dq[{tag}]", dt, attention._attn_bwd_dq_kernel,
                {**bwd_sig, "DQ": f"*{dt}", "num_m_blocks": "i32"},
                {**flags, "BLOCK_M": bm2, "BLOCK_N": bn2}, w2, div, num_stages=st2,
            ))

    for dt, D in [(dt, 128) for dt in DTYPES] + [("fp16", 80)]:
        block_d = attention._block_d(D)
        specs.append(Spec(
            f"attn_bwd_delta[D={D}]", dt, attention._attn_bwd_delta_kernel,
            {"Out": f"*{dt}", "DOut": f"*{dt}", "Delta": "*fp32", "n_rows": "i32", "D": "i32"},
            {"PAD_D": block_d != D, "BLOCK_M": attention.DELTA_BLOCK_ROWS, "BLOCK_D": block_d}, 4,
            () if block_d != D else ("D",),
        ))

    # Decode: (dtype, D, G, Tn, one chunk). One new token of an 8-head GQA group, written as
    # partials or (one chunk) as the output itself; 4 new tokens of an MHA head (speculative decoding).
    decode_cases = [(dt, 128, None, 1, False) for dt in DTYPES]
    decode_cases += [("fp16", 128, None, 1, True), ("fp16", 64, 1, 4, False), ("bf16", 80, None, 1, False),
                     ("bf16", 256, None, 1, False)]
    for dt, D, G, Tn, final in decode_cases:
        block_d = attention._block_d(D)
        pad = block_d != D
        bm, bn, warps, st = attention.decode_tiles(block_d, torch_dt[dt], True, (G or 8) * Tn)
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Seqlens": "*i32",
               "Out": f"*{dt}" if final else "*fp32", "Lse": "*fp32",
               "Hq": "i32", "Tmax": "i32", "D": "i32", "chunk": "i32", "qk_scale": "fp32"}
        consts = {"PAD_D": pad, "UPCAST": False, "PREC": "ieee" if dt == "fp32" else "tf32", "WHILE_LOOPS": False,
                  "WRITE_FINAL": final, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "num_row_blocks": 1}
        for name, val in (("G", G), ("Tn", Tn), ("num_splits", 1 if final else None)):
            if val is None:
                sig[name] = "i32"
            else:
                consts[name] = val
        specs.append(Spec(
            f"attn_decode[{'final' if final else 'split'},G={G or 'n'},Tn={Tn},D={D}]", dt,
            attention._decode_split_kernel, sig, consts, warps,
            ("Tmax", "chunk") if pad else ("Tmax", "chunk", "D"), num_stages=st,
        ))
    for dt, D, block_s in [(dt, 128, attention.MAX_SPLITS) for dt in DTYPES] + [("fp16", 80, 4)]:
        block_d = attention._block_d(D)
        specs.append(Spec(
            f"attn_decode_combine[S={block_s},D={D}]", dt, attention._decode_combine_kernel,
            {"Part": "*fp32", "Lse": "*fp32", "Out": f"*{dt}", "num_splits": "i32", "D": "i32"},
            {"PAD_D": block_d != D, "BLOCK_S": block_s, "BLOCK_D": block_d},
            attention.combine_warps(block_s, block_d), () if block_d != D else ("D",),
        ))
    return specs


def quant_matmul_specs() -> list[Spec]:
    from kernels import quant_matmul as qmm

    specs = []
    # (bits, group size, zeros): int8 per channel, int4 symmetric at the smallest group, int4
    # asymmetric at the largest.
    formats = ((8, 0, False), (4, 32, False), (4, 128, True))
    for dt in DTYPES:
        for bits, group, has_z in formats:
            qtype = "*i8" if bits == 8 else "*u8"
            sig = {"X": f"*{dt}", "Qw": qtype, "S": "*fp32", "Z": "*fp32", "B": f"*{dt}", "Y": f"*{dt}",
                   "P": "*fp32", "M": "i32", "N": "i32", "K": "i32", "q_stride": "i32", "k_split": "i32",
                   "steps": "i32"}
            fmt = f"int{bits}" + (f",g{group}" if bits == 4 else "") + (",zeros" if has_z else "")
            flags = {"BITS": bits, "GROUP": group if bits == 4 else 1, "HAS_Z": has_z}
            # Decode (GEMV) at both ends of its M range, split and not; the GEMM with small and
            # large M tiles. Bias on in one of each pair, so both epilogues compile.
            for M, split in ((1, True), (8, False)):
                block_m, block_n, block_k = qmm.gemv_config(M, bits, group)
                specs.append(Spec(
                    f"qmm_gemv[{fmt},M={M}{',split' if split else ',bias'}]", dt, qmm._qmm_gemv_kernel, sig,
                    {**flags, "HAS_B": not split, "SPLIT": split,
                     "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                    qmm.GEMV_WARPS, ("N", "K", "q_stride", "k_split"),
                ))
            for M, split in ((16, True), (512, False)):
                block_m, block_n, block_k, warps, _ = qmm.gemm_config(M, 4096, bits, group, dt == "fp32")
                specs.append(Spec(
                    f"qmm_gemm[{fmt},M={M}{',split' if split else ',bias'}]", dt, qmm._qmm_gemm_kernel, sig,
                    {**flags, "HAS_B": not split, "SPLIT": split, "F32_DOT": dt == "fp32",
                     "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                    warps, ("N", "K", "q_stride", "k_split"),
                ))
        for has_b in (False, True):
            specs.append(Spec(
                f"qmm_reduce[{'bias' if has_b else 'no bias'}]", dt, qmm._qmm_reduce_kernel,
                {"P": "*fp32", "B": f"*{dt}", "Y": f"*{dt}", "MN": "i32", "N": "i32", "splits": "i32"},
                {"HAS_B": has_b, "BLOCK": qmm.REDUCE_BLOCK}, 4, ("MN", "N"),
            ))
    return specs


def activation_specs() -> list[Spec]:
    from kernels import activation

    specs = []
    for dt in DTYPES:
        # A typical MLP width (full tiles, N divisible by 16) and a ragged one (masked columns).
        for N, aligned in ((3072, True), (1000, False)):
            block_m, block_n, warps = activation.tile(8192, N, True)
            div = ("N",) if aligned else ()
            for tanh in (True, False):
                for has_b in (True, False):
                    tag = f"{'tanh' if tanh else 'erf'}{',b' if has_b else ''},N={N}"
                    specs.append(Spec(
                        f"bias_gelu_fwd[{tag}]", dt, activation._bias_gelu_fwd_kernel,
                        {"X": f"*{dt}", "B": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32"},
                        {"HAS_B": has_b, "TANH": tanh, "BLOCK_M": block_m, "BLOCK_N": block_n}, warps, div,
                    ))
                    for need_db in ((True, False) if has_b else (False,)):
                        specs.append(Spec(
                            f"bias_gelu_bwd[{tag}{',db' if need_db else ''}]", dt, activation._bias_gelu_bwd_kernel,
                            {"DY": f"*{dt}", "X": f"*{dt}", "B": f"*{dt}", "DX": f"*{dt}", "DB_part": "*fp32",
                             "M": "i32", "N": "i32"},
                            {"HAS_B": has_b, "NEED_DB": need_db, "TANH": tanh, "BLOCK_M": block_m,
                             "BLOCK_N": block_n}, warps, div,
                        ))
    return specs


SPEC_BUILDERS = [norm_specs, embedding_specs, attention_specs, quant_matmul_specs, activation_specs]


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
