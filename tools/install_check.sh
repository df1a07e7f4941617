#!/usr/bin/env bash
# fastlm installed the way a user installs it: a fresh venv that holds only torch, an sdist built
# from this tree, and `pip install <sdist>` through pip's isolated build. Checks that the sdist
# holds what a build needs and nothing else, that no torch is downloaded, and that the extension
# loads against the venv's torch and runs an op.
#
#   bash tools/install_check.sh          # TORCH_SPEC picks the torch (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
$PYTHON -m venv "$WORK/venv"
V=$WORK/venv/bin
$V/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" build
$V/python -m build -q --sdist --outdir "$WORK/dist" . > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/fastlm-*.tar.gz)
tar -tzf "$SDIST" > "$WORK/files"
for need in csrc/registration.cpp csrc/cuda/attention.cu fastlm/kernels/norm.py build_backend/fastlm_build_backend.py \
            fastlm/_build.py README.md; do
  grep -q "/$need\$" "$WORK/files" || { echo "install-check: the sdist lacks $need"; exit 1; }
done
if grep -E "benchmarks/results|\.so$|\.pyc$" "$WORK/files"; then echo "install-check: the sdist holds files it should not"; exit 1; fi
echo "install-check: sdist $(basename "$SDIST"), $(wc -l < "$WORK/files") files, $(du -k "$SDIST" | cut -f1) KiB"
$V/python -m pip install -v "$SDIST" > "$WORK/install.log" 2>&1 || { tail -40 "$WORK/install.log"; exit 1; }
if grep -iE "(Downloading|Collecting) torch" "$WORK/install.log"; then echo "install-check: pip fetched a torch"; exit 1; fi
grep "fastlm: building" "$WORK/install.log" | sed 's/^ *//'
cd "$WORK"
$V/fastlm info | sed -n 2,3p
$V/python - <<'PY'
import torch

import fastlm
from fastlm import backends

assert backends.extension_error() is None, backends.extension_error()
x, w = torch.randn(4, 64), torch.randn(64)
y = fastlm.ops.layer_norm(x, (64,), w, backend="cpu")
torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (64,), w))
print("install-check: fastlm._C loaded from", backends.extension_info()[0], "and ran layer_norm on the cpu backend")
PY
echo "install-check: passed in $(( $(date +%s) - t0 )) s"
