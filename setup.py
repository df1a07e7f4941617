"""Builds the compiled extension fastlm._C; everything else is in pyproject.toml.

It compiles against the torch that fastlm will run with (build_backend/ says how pip's isolated
build reaches it) and records that torch beside the library, so that a later torch is noticed
instead of crashing. CPU C++ sources are always built; CUDA sources when torch is a CUDA build and
a CUDA toolkit of the same major version is present (FASTLM_CUDA=0/1 forces the choice), and the
build log says which and why. TORCH_CUDA_ARCH_LIST is honoured and defaults to 9.0 (Hopper) when
no GPU is visible, since torch cannot guess an arch without one. With no torch at all, the wheel
holds the sources only, and `fastlm build` compiles them for the torch installed later.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fastlm_build", HERE / "fastlm" / "_build.py")
fb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fb)


def extension_and_command():
    from torch.utils import cpp_extension

    cuda, why = fb.cuda_plan()
    print(f"fastlm: building fastlm._C {'with' if cuda else 'without'} CUDA kernels ({why})", file=sys.stderr)
    root = "csrc"
    kw = dict(include_dirs=[str(HERE / root)], extra_link_args=fb.LD_FLAGS)
    if cuda:
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        ext = cpp_extension.CUDAExtension(
            "fastlm._C", fb.sources(Path(root), True), define_macros=[("FASTLM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": fb.CXX_FLAGS, "nvcc": fb.NVCC_FLAGS}, **kw)
    else:
        ext = cpp_extension.CppExtension("fastlm._C", fb.sources(Path(root), False),
                                         extra_compile_args={"cxx": fb.CXX_FLAGS}, **kw)

    class BuildExt(cpp_extension.BuildExtension):
        def build_extension(self, e):
            super().build_extension(e)
            # Beside the library, wherever it goes (the wheel or, for -e, the package folder).
            fb.write_info(Path(self.get_ext_fullpath(e.name)).parent, cuda, why)

    return ext, BuildExt.with_options(use_ninja=True)


if importlib.util.find_spec("torch") is None:
    print("fastlm: torch is not installed here, so the wheel holds the C++ sources without compiling them; "
          "after installing torch run `fastlm build`", file=sys.stderr)
    setup()
else:
    ext, cmd = extension_and_command()
    setup(ext_modules=[ext], cmdclass={"build_ext": cmd})
