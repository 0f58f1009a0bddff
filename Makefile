# One command sets everything up and runs the demo; one sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.datalora-installed

.PHONY: demo test test-min lint bench wheel clean compile-check-alt

# With an NVIDIA GPU the venv sees the system site-packages, so the CUDA torch the user
# already has is reused; without one, torch==2.13.0 is installed first. Plain PyPI serves
# the multi-GB CUDA build on Linux x86_64 (this workplace's pip finds the CPU wheel in its
# find-links); elsewhere `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the
# CPU build from PyTorch's index.
TORCH_INDEX ?=
TORCH_INDEX_FLAG := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
VENV_FLAGS := $(if $(HAS_GPU),--system-site-packages,)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --upgrade pip
	@if [ -z "$(HAS_GPU)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no NVIDIA GPU found: installing torch==2.13.0 $(TORCH_INDEX_FLAG)"; \
		$(PY) -m pip install torch==2.13.0 $(TORCH_INDEX_FLAG); \
	fi
	$(PY) -m pip install -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m datalora demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.molora

# Compiles every Triton kernel for sm_80 / sm_90 under a second Triton release in a side
# venv (the GPU machine runs 3.6; the dev venv 3.9): no errors, no register spills.
TRITON_ALT ?= 3.6.0
ALT_VENV := .venv-triton-$(TRITON_ALT)
compile-check-alt:
	@test -x $(ALT_VENV)/bin/python || $(PYTHON) -m venv $(ALT_VENV)
	$(ALT_VENV)/bin/python -m pip install -q torch==2.13.0 $(TORCH_INDEX_FLAG)
	DATALORA_BUILD_CUDA=0 $(ALT_VENV)/bin/python -m pip install -q -e . triton==$(TRITON_ALT)
	TRITON_INTERPRET= $(ALT_VENV)/bin/python -m benchmarks.resources --triton-only

# The tests that meet transformers / accelerate / peft / datasets, under the oldest
# releases pyproject allows, in a side venv (torch stays 2.13.0: the CPU build at hand).
MIN_PINS ?= transformers==4.56.* accelerate==1.3.* peft==0.15.* datasets==3.0.*
MIN_VENV := .venv-min
MIN_TESTS ?= tests/test_architectures.py tests/test_data.py tests/test_demo.py \
	tests/test_generation_hooks.py tests/test_model.py tests/test_titok.py tests/test_tle.py \
	tests/test_trainer.py tests/test_user_flows.py
test-min:
	@test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q torch==2.13.0 $(TORCH_INDEX_FLAG)
	DATALORA_BUILD_CUDA=0 $(MIN_VENV)/bin/python -m pip install -q -e ".[dev]" $(MIN_PINS)
	$(MIN_VENV)/bin/python -m pytest -n 2 --dist loadgroup -q -ra $(MIN_TESTS)

wheel: $(STAMP)
	$(PY) -m build --wheel --no-isolation

clean:
	rm -rf build dist *.egg-info datalora/_C*.so
