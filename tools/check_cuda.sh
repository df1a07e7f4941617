#!/usr/bin/env bash
# Compile-checks the CUDA side of fastlm._C without a GPU or a CUDA-enabled torch: every
# csrc/cuda/*.cu through `nvcc -c -arch=sm_90`, and csrc/registration.cpp with FASTLM_WITH_CUDA
# through `g++ -fsyntax-only`, against the headers of the torch that $PYTHON imports (default
# .venv/bin/python). Flags follow the CUDA build's (fastlm/_build.py), plus what the CPU wheel needs
# (-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE: it lacks that generated header). Objects go to a temp dir.
#
# Then tools/check_sass.py reads the objects' SASS: an fp16/bf16 kernel whose global loads are
# narrower than its float32 twin's fails the check (only those kernels are printed).
# Exit 0 when all compile, or when there is no nvcc (with a SKIP line); 1 on any failure.
# JOBS sets the parallel compiles (default: the number of cores); FASTLM_CXX_STD the -std
# (default: fastlm/_build.py's).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc; }
if [ -z "$NVCC" ]; then
  echo "check_cuda: SKIP: nvcc not found (install the CUDA toolkit to compile-check csrc/cuda)"
  exit 0
fi
JOBS=${JOBS:-$(nproc)}
STD=${FASTLM_CXX_STD:-$(grep -o -- '-std=c++[0-9]*' fastlm/_build.py | head -1 | cut -d= -f2)}
[ -n "$STD" ] || { echo "check_cuda: FAIL: no -std= flag in fastlm/_build.py (set FASTLM_CXX_STD)"; exit 1; }

read -r -a TORCH_INC < <("$PYTHON" -c '
from torch.utils import cpp_extension as c
print(" ".join("-I" + p for p in c.include_paths()))') || { echo "check_cuda: FAIL: $PYTHON cannot import torch"; exit 1; }
# torch's own nvcc flags for extensions (no implicit half conversions, relaxed constexpr).
read -r -a TORCH_NVCC < <("$PYTHON" -c '
from torch.utils import cpp_extension as c
print(" ".join(c.COMMON_NVCC_FLAGS))')
COMMON=(-std="$STD" -I csrc "${TORCH_INC[@]}" -DFASTLM_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
NVCC_FLAGS=(-arch=sm_90 -O3 --use_fast_math -lineinfo "${TORCH_NVCC[@]}" -Xcompiler -fPIC)

OUT=$(mktemp -d "${TMPDIR:-/tmp}/check_cuda.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

# compile NAME CMD...: runs CMD, logging to $OUT/NAME.log and its status and seconds to .rc.
compile() {
  local name=$1 start=$SECONDS rc
  shift
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$rc $((SECONDS - start))" >"$OUT/$name.rc"
}

sources=(csrc/cuda/*.cu)
[ -e "${sources[0]}" ] || sources=()
names=()
start=$SECONDS
for src in "${sources[@]}"; do
  name=$(basename "$src")
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  compile "$name" "$NVCC" -c "${NVCC_FLAGS[@]}" "${COMMON[@]}" "$src" -o "$OUT/$name.o" &
  names+=("$name")
done
while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
compile registration.cpp g++ -fsyntax-only -fPIC "${COMMON[@]}" csrc/registration.cpp &
names+=(registration.cpp)
wait

failed=0
for name in "${names[@]}"; do
  read -r rc secs <"$OUT/$name.rc"
  # Only our own files' diagnostics: torch's headers warn under -std=c++17.
  ours=$(grep -E '(^|/)csrc/[^:( ]+[:(][0-9]+' "$OUT/$name.log" | grep -iE 'error|warning' || true)
  if [ "$rc" -eq 0 ]; then
    printf 'check_cuda: ok    %-22s %4d s\n' "$name" "$secs"
    [ -n "$ours" ] && echo "$ours"
  else
    failed=1
    printf 'check_cuda: FAIL  %-22s %4d s\n' "$name" "$secs"
    grep -E -A3 'error' "$OUT/$name.log" | head -60
  fi
done
echo "check_cuda: ${#names[@]} files in $((SECONDS - start)) s ($JOBS jobs, -std=$STD, $("$NVCC" --version | grep -o 'release [0-9.]*'))"
# The load widths of the fp16/bf16 kernels, from the objects just built (tools/check_sass.py).
objs=("$OUT"/*.cu.o)
if [ -e "${objs[0]}" ]; then
  "$PYTHON" tools/check_sass.py "${objs[@]}" >"$OUT/sass.txt" 2>&1 || failed=1
  grep -vE '^  (ok|not judged)' "$OUT/sass.txt"
fi
exit $failed
