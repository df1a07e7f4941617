"""How fastlm._C is compiled, in one place: at install (setup.py) or for the running torch
(`fastlm build`, which compiles into a cache and needs no reinstall).

A C++ extension only works with the torch it was compiled against, so every build records that
torch beside the library (BUILD_INFO, a JSON file), and fastlm.backends loads a library only when
the record matches the running torch. This module imports no torch at module level: setup.py
loads it from its path in a build environment that may not have torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

# -mavx2, not -march=native: the binary must run on every x86-64 machine with AVX2 (wider paths
# are chosen at run time); -g0 because Python's flags add -g, which triples object sizes.
CXX_FLAGS = ["-O3", "-g0", "-std=c++20", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
BUILD_INFO = "_C.build.json"


def source_dir() -> Path:
    """csrc/: in a source tree beside the package; in an installed wheel, packaged as fastlm/_csrc."""
    here = Path(__file__).resolve().parent
    for d in (here / "_csrc", here.parent / "csrc"):
        if (d / "registration.cpp").exists():
            return d
    raise FileNotFoundError(f"fastlm: the C++ sources are not installed (looked in {here / '_csrc'})")


def sources(root: Path, cuda: bool) -> list[str]:
    files = sorted([*root.glob("*.cpp"), *root.glob("cpu/*.cpp"), *(root.glob("cuda/*.cu") if cuda else [])])
    return [str(f) for f in files]


def _nvcc_release(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m[1]}.{m[2]}" if m else None


def cuda_plan() -> tuple[bool, str]:
    """(whether to compile the CUDA sources, why). Only for a CUDA-enabled torch and a toolkit
    whose major version matches the one torch was built with; FASTLM_CUDA=0/1 forces it."""
    import torch
    from torch.utils import cpp_extension

    forced = os.environ.get("FASTLM_CUDA")
    if forced is not None:
        return forced == "1", f"FASTLM_CUDA={forced}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, f"no CUDA toolkit found for torch's CUDA {torch.version.cuda} (set CUDA_HOME)"
    release = _nvcc_release(cpp_extension.CUDA_HOME)
    if release is None or release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return False, (f"the CUDA toolkit at {cpp_extension.CUDA_HOME} is release {release}, torch was "
                       f"built with CUDA {torch.version.cuda}")
    return True, f"CUDA {release} for torch's CUDA {torch.version.cuda}"


def torch_tag() -> dict:
    """What a build must match: torch's version and its CUDA version."""
    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda}


def write_info(directory: Path, cuda: bool, why: str) -> None:
    info = {**torch_tag(), "cuda_kernels": cuda, "cuda_why": why}
    (Path(directory) / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")


def read_info(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def cache_dir() -> Path:
    """Where `fastlm build` puts the library: keyed by the torch it is for and the sources' hash."""
    import torch

    root = source_dir()
    h = hashlib.sha256()
    for f in sources(root, cuda=True) + [str(p) for p in sorted(root.rglob("*.h*"))]:
        h.update(Path(f).read_bytes())
    h.update(" ".join(CXX_FLAGS + NVCC_FLAGS).encode())
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}")
    base = Path(os.environ.get("FASTLM_CACHE") or Path.home() / ".cache" / "fastlm")
    return base / "ext" / f"{tag}-{h.hexdigest()[:16]}"


def build(verbose: bool = False) -> Path:
    """Compile fastlm._C for the running torch into cache_dir() and load it; returns the library."""
    from torch.utils import cpp_extension

    cuda, why = cuda_plan()
    root, out = source_dir(), cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        "fastlm_C", sources(root, cuda), extra_cflags=CXX_FLAGS + (["-DFASTLM_WITH_CUDA=1"] if cuda else []),
        extra_cuda_cflags=NVCC_FLAGS + ["-DFASTLM_WITH_CUDA=1"], extra_ldflags=LD_FLAGS,
        extra_include_paths=[str(root)], build_directory=str(out), with_cuda=cuda, is_python_module=False,
        verbose=verbose)
    write_info(out, cuda, why)
    return Path(path)
