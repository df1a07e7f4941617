# The two commands of the README, `make bench` and `make test`, each do their own set-up:
# a virtual environment in .venv, torch (the CPU wheel when none is importable and no GPU is
# present), and fastlm with its dev and hf (transformers, for fastlm/hf.py) extras, which
# compiles the extension fastlm._C.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build when no GPU is present: a plain `pip install torch` would pull a CUDA build of
# several GB. Set TORCH_SPEC/TORCH_PIP_ARGS to pick another (e.g. an index of CPU wheels).
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.fastlm-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test bench setup lint test-cpu test-triton check-triton check-cuda cuda-link-check install-check clean

test: setup lint test-cpu test-triton check-triton check-cuda

bench: setup
	$(VENV)/bin/fastlm bench

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU present: installing torch"; $(PY) -m pip install -q torch; \
	  else echo "no GPU: installing $(TORCH_SPEC) (CPU)"; $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi; \
	fi
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,hf]"
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .

# The main suite; Triton tests need TRITON_INTERPRET=1 before triton is imported, so they run
# in a process of their own.
test-cpu: setup
	$(PY) -m pytest -q -m "not triton"

test-triton: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

# Compile every Triton kernel for Hopper (sm_90) without a GPU.
check-triton: setup
	$(PY) tools/check_triton.py

# nvcc -arch=sm_90 compile check of every csrc/cuda/*.cu (skipped where nvcc is absent).
check-cuda: setup
	PYTHON=$(PY) bash tools/check_cuda.sh

# Install as a user would: a fresh venv holding only torch, then `pip install` of an sdist (pip's
# isolated build), checked to download no torch, load the extension and run an op on it.
install-check:
	bash tools/install_check.sh

# Build and link the real CUDA extension against a CUDA-enabled torch in .venv-cuda.
cuda-link-check:
	bash tools/cuda_link_check.sh

clean:
	rm -rf build fastlm/_C*.so fastlm/_C.build.json *.egg-info .pytest_cache
