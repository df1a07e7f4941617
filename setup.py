"""Builds the compiled extension fastlm._C; everything else is in pyproject.toml.

CPU C++ sources are always built. CUDA sources are added when a CUDA toolkit and a CUDA-enabled
torch are both present; FASTLM_CUDA=0/1 forces the choice. TORCH_CUDA_ARCH_LIST is honoured and
defaults to 9.0 (Hopper) when no GPU is visible, since torch cannot guess an arch without one.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("FASTLM_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def extension():
    cxx = ["-O3", "-g0", "-std=c++20", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not want_cuda():
        return cpp_extension.CppExtension(
            "fastlm._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "fastlm._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("FASTLM_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
