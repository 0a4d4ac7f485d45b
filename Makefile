# make demo / make test create .venv on first use and install the pinned set; later runs only
# re-install what changed (stamps below), so they start in seconds.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Keep the venv's ninja first on PATH in every process: mixing it with /usr/bin/ninja makes
# DeepSpeed rebuild its ops on every run.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# DeepSpeed's CPU accelerator unless a GPU machine says otherwise.
DS_ACCEL ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: demo test env clean-venv lock help

help:
	@echo "make demo   - the main job end to end on the embedded real data set"
	@echo "make test   - the test suite (pytest)"
	@echo "make env    - stm-env report"

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(VENV)/.deps: requirements/lock.txt requirements/deepspeed.txt | $(PY)
	$(PIP) install -r requirements/lock.txt
	# DeepSpeed from source with its ops compiled now, not just in time inside a run.
	DS_ACCELERATOR=$(DS_ACCEL) DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
	  DS_BUILD_SHM_COMM=1 DS_ENABLE_NINJA=1 \
	  $(PIP) install --no-build-isolation -r requirements/deepspeed.txt
	touch $@

$(VENV)/.pkg: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 | grep -E '\[stm_dist setup\]|Successfully|ERROR|error' || true
	$(PY) -c "import torch, stm_dist._C" || { echo "stm_dist._C failed to build/load"; exit 1; }
	touch $@

env: $(VENV)/.pkg
	$(VENV)/bin/stm-env

test: $(VENV)/.pkg
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.pkg
	$(PY) -m stm_dist.cli.demo

# Regenerate the lock from the current venv (after deliberately changing a version).
lock:
	{ grep '^#' requirements/lock.txt; $(PIP) freeze --exclude-editable | grep -v -i -E '^(deepspeed|stm-dist)=='; } > requirements/lock.tmp
	mv requirements/lock.tmp requirements/lock.txt

clean-venv:
	rm -rf $(VENV) build *.egg-info stm_dist/_C*.so
