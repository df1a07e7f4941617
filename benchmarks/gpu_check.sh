#!/usr/bin/env bash
# The one script for a GPU machine (H200, sm_90; its own torch and triton, no package registry):
# build fastlm._C with its CUDA kernels, run the test suite on the GPU, run the benchmarks, and
# write the results. Designed to finish inside 9.5 minutes (the build ~2-3, tests <= 2.5, benchmarks
# <= 5 in all).
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/, log in $OUT if set
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
LOG=${OUT:-/tmp}/gpu_check.log
export PYTHONUNBUFFERED=1 FASTLM_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

{
step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

step "build fastlm._C for sm_$TORCH_CUDA_ARCH_LIST"
# No registry here: install with what the image has, and build in place.
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "BUILD FAILED"; exit 1; }
$PY -m fastlm.cli info

step "tests on the GPU"
# No -x: a first run on a new machine should report every failure, not the first.
timeout 150 $PY -m pytest -q -p no:cacheprovider tests || status=1

step "benchmarks"
# One process per op, each with its own time limit, so one slow op cannot starve the others.
# The model gets the most: it compiles gpt2 twice (the training-step case and the step with AdamW).
for spec in norm:20 embedding:20 activation:20 attention:60 quant_matmul:40 model:140; do
  op=${spec%%:*}
  $PY -c "import sys, fastlm.bench as b; sys.exit('$op' not in b.OPS)" || continue
  timeout "${spec##*:}" $PY -m fastlm.cli bench --device cuda --op "$op" --quick --out "$RESULTS" || status=1
done
if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.json "$RESULTS"/*.png "$OUT"/ 2>/dev/null || true; fi
step "done: status $status"
exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
