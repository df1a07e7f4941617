"""tools/check_sass.py reads load widths from compiled SASS and flags an fp16/bf16 kernel whose
loads are narrower than its float32 twin's: one kernel compiled both ways proves it can fail."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_sass", ROOT / "tools" / "check_sass.py")
check_sass = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_sass)

NVCC = shutil.which("nvcc")
pytestmark = [pytest.mark.skipif(NVCC is None, reason="needs nvcc"),
              pytest.mark.skipif(check_sass.cuobjdump() is None, reason="needs cuobjdump (triton ships one)")]

# A stand-in for c10::Half (the name is what the check looks for), and a copy kernel moving
# 8 elements per thread: in one aligned Pack, or (NARROW) one element at a time for 2-byte types.
SOURCE = r"""
namespace c10 { struct Half { unsigned short x; }; }
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };
template <typename T>
__global__ void copy8(const T* __restrict__ in, T* __restrict__ out) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
#if NARROW
  if constexpr (sizeof(T) == 2) {
    for (int j = 0; j < 8; ++j) out[i + j] = in[i + j];
    return;
  }
#endif
  *reinterpret_cast<Pack<T, 8>*>(out + i) = *reinterpret_cast<const Pack<T, 8>*>(in + i);
}
template __global__ void copy8<float>(const float*, float*);
template __global__ void copy8<c10::Half>(const c10::Half*, c10::Half*);
"""


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    d = tmp_path_factory.mktemp("sass")
    (d / "copy.cu").write_text(SOURCE)
    out = {}
    for narrow in (0, 1):
        obj = d / f"copy{narrow}.o"
        subprocess.run([NVCC, "-c", "-arch=sm_90", "-O3", "-std=c++17", f"-DNARROW={narrow}", str(d / "copy.cu"),
                        "-o", str(obj)], check=True, capture_output=True)
        out[narrow] = str(obj)
    return out


def test_widths_are_read_from_the_sass(objects):
    ks = check_sass.kernels(objects[0], check_sass.cuobjdump())
    wide = {name: check_sass.widest(c, "LDG") for name, c in ks.items()}
    assert wide == {"void copy8<float>(float const*, float*)": 128,
                    "void copy8<c10::Half>(c10::Half const*, c10::Half*)": 128}
    narrow = check_sass.kernels(objects[1], check_sass.cuobjdump())
    assert check_sass.widest(narrow["void copy8<c10::Half>(c10::Half const*, c10::Half*)"], "LDG") == 16


def test_a_narrow_half_kernel_fails_the_check(objects, capsys):
    assert check_sass.main([objects[0]]) == 0
    assert check_sass.main([objects[1]]) == 1
    assert "NARROW (half of the float32 twin's 64 bits)" in capsys.readouterr().out
