#!/usr/bin/env bash
# Builds the real CUDA extension (fastlm._C with csrc/cuda/*.cu) on a machine without a GPU,
# against a CUDA-enabled torch in .venv-cuda, then loads it and checks that every op has a CPU
# and a CUDA kernel and that no fastlm symbol is left undefined. check_cuda.sh only compiles each
# .cu alone; this catches what only linking shows (a declared entry point never defined, a
# signature that differs between fastlm.h and a .cu file, a missing library).
#
# The first run installs torch (~1.5 min, 5.5 GB) into .venv-cuda and builds (~2 min on 2
# cores); later runs reuse the venv and the objects in build/cuda-link-check, so only changed
# sources recompile (~20 s when none did). The extension is built there too, never into
# fastlm/, so the main venv's in-place build is left alone.
#
# Environment: CUDA_VENV (default .venv-cuda), CUDA_TORCH (default torch==2.14.1),
# BASE_PYTHON (the interpreter that creates the venv, default python3), CUDA_HOME (default
# /usr/local/cuda), MAX_JOBS (default: the number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
CUDA_TORCH=${CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# No GPU to ask for an architecture: without this torch's build crashes (IndexError).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTLM_CUDA=1

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_link_check: SKIP: no nvcc at $CUDA_HOME/bin/nvcc"
  exit 0
fi

t0=$SECONDS
stamp() { echo "cuda_link_check: $1 ($((SECONDS - t0)) s so far)"; }

# --- the venv: created and filled only when something is missing -----------------------------
if [ ! -x "$VENV/bin/python" ]; then
  "${BASE_PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
pip_install() {  # quiet unless it fails
  local log
  log=$(mktemp)
  if ! "$PY" -m pip install "$@" >"$log" 2>&1; then
    tail -30 "$log"
    echo "cuda_link_check: FAIL: pip install $*"
    exit 1
  fi
  rm -f "$log"
}
want_version=${CUDA_TORCH#torch==}
if ! "$PY" - "$want_version" <<'EOF' 2>/dev/null; then
import sys
import torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
  stamp "installing $CUDA_TORCH into $VENV"
  pip_install "$CUDA_TORCH"
fi
if ! "$PY" -c 'import setuptools, wheel, ninja' 2>/dev/null; then
  pip_install setuptools wheel ninja
fi
# ninja is found on PATH by torch's build.
export PATH=$VENV/bin:$PATH
stamp "venv ready: $("$PY" -W ignore -c 'import torch; print(torch.__version__)')"

# --- build ------------------------------------------------------------------------------------
BUILD=$ROOT/build/cuda-link-check
mkdir -p "$BUILD"
log=$BUILD/build.log
if ! "$PY" setup.py build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp" >"$log" 2>&1; then
  grep -E -B2 -A8 'error|Error' "$log" | head -80 || true
  echo "cuda_link_check: FAIL: build failed; full log: $log"
  exit 1
fi
so=$(find "$BUILD/lib/fastlm" -name '_C*.so' -print -quit 2>/dev/null || true)
[ -n "$so" ] || { echo "cuda_link_check: FAIL: no _C*.so under $BUILD/lib/fastlm"; exit 1; }
stamp "built $so"

# --- symbols ----------------------------------------------------------------------------------
dyn_undefined=$(nm -DC --undefined-only "$so")
dyn_defined=$(nm -DC --defined-only "$so")
undefined=$(grep -E 'fastlm' <<<"$dyn_undefined" || true)
if [ -n "$undefined" ]; then
  echo "cuda_link_check: FAIL: undefined fastlm symbols in $so:"
  echo "$undefined"
  exit 1
fi
# Every backend entry point that fastlm.h declares must be defined in the library.
missing=()
for f in $(grep -oE '\b[a-z0-9_]+_(cpu|cuda)\(' csrc/fastlm.h | tr -d '(' | sort -u); do
  grep -q "fastlm::$f(" <<<"$dyn_defined" || missing+=("$f")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "cuda_link_check: FAIL: declared in csrc/fastlm.h but not defined: ${missing[*]}"
  exit 1
fi

# --- load: dlopen resolves every symbol now (RTLD_NOW), and registration runs ------------------
"$PY" -W ignore::UserWarning - "$so" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
schemas = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("fastlm_C::")]
ops = sorted({s.name for s in schemas})
assert "fastlm_C::norm_fwd" in ops, f"fastlm_C::norm_fwd not registered (found {ops})"
# The CPU integer-dot path has no CUDA kernel by design (the GPU kernels keep their float path),
# nor has the decode block built on it.
CPU_ONLY = {"fastlm_C::quant_matmul_dot", "fastlm_C::decode_blocks"}


def composite(op):
    """An op defined with its function (no tensor arguments: one kernel for every device)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeImplicitAutograd")


missing = [
    f"{op} ({key})"
    for op in ops if not composite(op)
    for key in (("CPU",) if op in CPU_ONLY else ("CPU", "CUDA"))
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
]
assert not missing, f"ops without a kernel: {missing}"
both = [op for op in ops if op not in CPU_ONLY and not composite(op)]
print(f"cuda_link_check: loaded with torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"CPU and CUDA kernels for {', '.join(both)}; CPU only: {', '.join(sorted(CPU_ONLY))}; "
      f"device-free: {', '.join(op for op in ops if composite(op))}")
EOF
stamp "OK"
