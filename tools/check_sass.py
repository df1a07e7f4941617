"""Widths of the global memory accesses in compiled CUDA kernels (sm_90 SASS, read with the
cuobjdump that ships inside the triton package), and a check that fp16/bf16 kernels move their
data in wide accesses.

    python tools/check_sass.py OBJ.o ...        # table per kernel; exit 1 on a narrow kernel

nvcc turns a copy of a struct of 2-byte elements into 2-byte loads unless it can prove the
struct's alignment, so a Pack<Half, 8> may compile to eight LDG.E.U16 where one LDG.E.128 was
meant. The check: the widest global load of every fp16/bf16 instantiation of a kernel must be at
least half that of its float32 twin (the same template with float: the same elements per access
in half the bytes). Where the vector width is counted in elements (Pack<Half, 8> beside
Pack<float, 4>) there is no exact twin: then the template's widest fp16/bf16 instantiation must
match its widest float32 one. Tensor-core kernels (fp16/bf16 only) must reach the width EXPECT
gives them. Exit 0 also when no cuobjdump is found (a SKIP line), like tools/check_cuda.sh
without nvcc.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# LDG.E.128, LDG.E.U16.CONSTANT, LD.E.64 (generic), STG.E.U8 ...: the op and its width suffix.
# LDGSTS is cp.async: a global load straight into shared memory.
ACCESS = re.compile(r"\b(LDGSTS|LDG|LD|STG|ST)\.E((?:\.[A-Z0-9]+)*)")
WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
LOW = ("c10::Half", "c10::BFloat16")
# Kernels that exist for fp16/bf16 only (tensor cores) and the load width they must reach.
EXPECT = {re.compile(r"_mma_kernel<"): 128, re.compile(r"gemm_tc_kernel<[^>]*, true>"): 128}


def cuobjdump() -> str | None:
    """The cuobjdump inside the triton package (which needs no CUDA toolkit), else one on PATH."""
    try:
        import triton

        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.exists():
            return str(tool)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def width(suffix: str) -> int:
    for part in suffix.split("."):
        if part in WIDTH:
            return WIDTH[part]
    return 32


def kernels(obj: str, tool: str) -> dict[str, Counter]:
    """demangled kernel name -> Counter of ("LDG", bits) / ("STG", bits) accesses."""
    sass = subprocess.run([tool, "-sass", obj], capture_output=True, text=True, check=True).stdout
    out: dict[str, Counter] = {}
    current = None
    for line in sass.splitlines():
        if "Function : " in line:
            current = line.split("Function : ", 1)[1].strip()
            out[current] = Counter()
        elif current is not None:
            for op, suffix in ACCESS.findall(line):
                if ".SHARED" in suffix or ".LOCAL" in suffix:
                    continue
                out[current]["LDG" if op.startswith("LD") else "STG", width(suffix)] += 1
    names = list(out)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    return {d: out[n] for n, d in zip(names, demangled)}


def widest(c: Counter, op: str) -> int:
    return max((bits for (o, bits) in c if o == op), default=0)


def family_widest(ks: dict[str, Counter], name: str, dtype: str) -> int:
    """The widest global load over the instantiations of name's template for this element type."""
    template = name.split("<", 1)[0]
    first = re.compile(rf"<{re.escape(dtype)}[,>]")
    return max((widest(c, "LDG") for n, c in ks.items() if n.split("<", 1)[0] == template and first.search(n)),
               default=0)


def judge(ks: dict[str, Counter], name: str, low: str) -> tuple[int, int, str]:
    """(bits reached, bits wanted, what the want is) of one fp16/bf16 kernel; wanted 0: not judged."""
    got = widest(ks[name], "LDG")
    expect = next((bits for pat, bits in EXPECT.items() if pat.search(name)), None)
    if expect:
        return got, expect, "expected"
    twin = ks.get(name.replace(low, "float"))
    if twin is not None:
        # The same elements in half the bytes: a Pack that stayed one access.
        return got, max(16, widest(twin, "LDG") // 2), "half of the float32 twin's"
    # Vector widths counted in elements differ by dtype (8 halves, 4 floats): then the template's
    # widest fp16/bf16 instantiation must match its widest float32 one.
    return family_widest(ks, name, low), family_widest(ks, name, "float"), "the float32 instantiations'"


def main(objs: list[str]) -> int:
    tool = cuobjdump()
    if tool is None:
        print("check_sass: SKIP: no cuobjdump (pip install triton, or the CUDA toolkit)")
        return 0
    bad = 0
    for obj in objs:
        ks = kernels(obj, tool)
        print(f"{Path(obj).name}: {len(ks)} kernels")
        for name, c in ks.items():
            low = next((t for t in LOW if t in name), None)
            if low is None:
                continue
            got, want, why = judge(ks, name, low)
            verdict = ("not judged (no float32 instantiation)" if not want else
                       "ok" if got >= want else f"NARROW ({why} {want} bits)")
            bad += got < want
            loads = " ".join(f"{b}b:{n}" for (o, b), n in sorted(c.items()) if o == "LDG")
            print(f"  {verdict:<44} widest load {widest(c, 'LDG'):>3} bits [{loads}]  {name[:150]}")
    print(f"check_sass: {'FAIL' if bad else 'OK'}: {bad} fp16/bf16 kernel(s) with narrower loads than "
          f"their float32 instantiation")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
