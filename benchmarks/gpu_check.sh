#!/usr/bin/env bash
# The one script for a GPU machine (H200, sm_90; its own torch and triton, no package registry).
# GPU time is scarce, so one run must report everything it can, whatever fails on the way:
# every step has its own time limit, prints its exit status, writes its results into $OUT as it
# goes, and never stops the steps after it.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # results in $OUT (default /tmp/gpu_check)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh       # no GPU steps; also automatic without nvidia-smi
#
# Phases and their expected times on one H200 with 16 cores (ESTIMATES, not yet measured; the
# log's step lines give the real ones): the whole run is held under GPU_CHECK_BUDGET (510 s),
# each step's limit shrunk to leave the later phases their share.
#   1. correctness  build fastlm._C with its CUDA kernels (FASTLM_CUDA=1, ~1.5-3 min; if that fails,
#                   FASTLM_CUDA=0 so the Triton half still runs), then the GPU tests only: the cuda and
#                   triton backends on CUDA tensors plus the tests marked gpu (-m gpu), the files
#                   likeliest to fail first (~2-2.5 min). JUnit XML: $OUT/junit-*.xml.
#   2. speed        `fastlm bench --quick --device cuda`, one process per op (~3 min in all); each op's
#                   JSON is rewritten after every case, in $OUT/bench-<op>/, so a time limit keeps
#                   what finished.
#   3. sanitizer    one small case of each CUDA kernel under compute-sanitizer memcheck and racecheck,
#                   when the image has it and time is left (~1 min).
#   then            the pass/fail table of benchmarks/gpu_summary.py (seconds), also in $OUT/summary.txt.
# Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-510}
DRY=${GPU_CHECK_DRY:-}
command -v nvidia-smi >/dev/null 2>&1 || DRY=${DRY:-1}
[ "$DRY" = 0 ] && DRY=
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}
START=$SECONDS
status=0
: > "$OUT/steps.tsv"

# Seconds a step may take: its own cap, but never so long that fewer than $2 seconds are left for
# what comes after it; at least 5, so that a late step still starts and reports.
limit() {
  local left=$((BUDGET - (SECONDS - START) - $2))
  local t=$(( $1 < left ? $1 : left ))
  echo $(( t < 5 ? 5 : t ))
}

# step NAME LIMIT CMD...: runs CMD under the limit (SIGINT first: pytest then prints its summary
# and writes its JUnit file; KILL 15 s later), records and prints its exit status.
step() {
  local name=$1 lim=$2 t0=$SECONDS rc
  shift 2
  echo
  echo "=== $name (limit ${lim}s, $(date +%T))"
  timeout -s INT -k 15 "$lim" "$@"
  rc=$?
  [ "$rc" = 0 ] || status=1
  [ "$rc" = 124 ] && echo "--- $name: TIMED OUT after ${lim}s"
  echo "--- $name: exit $rc in $((SECONDS - t0))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$lim" >> "$OUT/steps.tsv"
}

# A bench stub for a step that did not run, so that every op has a JSON the summary can read.
stub() {
  mkdir -p "$OUT/bench-$1"
  printf '{"skipped": "%s", "ops": {"%s": {"skipped": "%s"}}}\n' "$2" "$1" "$2" > "$OUT/bench-$1/skipped.json"
}

# pytest's exit status 5 (nothing selected) is no failure: a file may hold no GPU test.
run_tests() {
  $PY -m pytest -q -p no:cacheprovider -m gpu -o junit_family=xunit2 --durations=15 "$@"
  local rc=$?
  return $(( rc == 5 ? 0 : rc ))
}
export -f run_tests
export PY
TESTS_FIRST="tests/test_attention.py tests/test_norm.py tests/test_quant_matmul.py"

{
echo "=== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
[ -n "$DRY" ] && echo "DRY RUN: no GPU steps; the test selection is still run (its GPU tests skip) and benches are stubs"

# ---- phase 1: correctness ----------------------------------------------------------------------
if [ -z "$DRY" ]; then
  # No registry here: install with what the image has, and build in place.
  step build-cuda "$(limit 240 240)" env FASTLM_CUDA=1 \
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
  if [ "$(tail -1 "$OUT/steps.tsv" | cut -f2)" != 0 ]; then
    echo "CUDA BUILD FAILED: building without the CUDA kernels, so that the Triton backend is still tested"
    step build-nocuda "$(limit 120 240)" env FASTLM_CUDA=0 \
      $PY -m pip install -q --no-deps --no-build-isolation --no-index -e .
  fi
  step info 60 $PY -m fastlm.cli info
fi
step tests-first "$(limit 120 200)" bash -c 'run_tests "$@"' run_tests --junitxml="$OUT/junit-first.xml" $TESTS_FIRST
# shellcheck disable=SC2046
step tests-rest "$(limit 90 180)" bash -c 'run_tests "$@"' run_tests --junitxml="$OUT/junit-rest.xml" tests \
  $(for f in $TESTS_FIRST; do printf -- '--ignore=%s ' "$f"; done)

# ---- phase 2: speed ----------------------------------------------------------------------------
# One process per op with its own limit, so one slow op cannot starve the others; the model last
# (it compiles gpt2 twice) with whatever is left.
for spec in norm:30 embedding:25 activation:25 rotary:20 attention:60 quant_matmul:40 model:90 hf:60; do
  op=${spec%%:*}
  $PY -c "import sys, fastlm.bench as b; sys.exit('$op' not in b.OPS)" 2>/dev/null || continue
  if [ -n "$DRY" ]; then
    stub "$op" "skipped: no GPU"
    continue
  fi
  step "bench-$op" "$(limit "${spec##*:}" 20)" $PY -m fastlm.cli bench --device cuda --op "$op" --quick \
    --out "$OUT/bench-$op"
  ls "$OUT/bench-$op"/*.json >/dev/null 2>&1 || stub "$op" "no result: exit status in steps.tsv"
done

# ---- phase 3: compute-sanitizer ----------------------------------------------------------------
if [ -z "$DRY" ] && command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    left=$((BUDGET - (SECONDS - START) - 15))
    if [ "$left" -lt 30 ]; then echo "=== sanitizer-$tool: skipped, ${left}s left"; continue; fi
    step "sanitizer-$tool" "$(limit 60 15)" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      --target-processes all $PY benchmarks/gpu_summary.py --small-cases
  done
elif [ -z "$DRY" ]; then
  echo "=== sanitizer: compute-sanitizer is not in this image"
fi

echo
echo "=== summary ($((SECONDS - START))s so far)"
$PY benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "=== done: status $status in $((SECONDS - START))s"
exit "$status"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
