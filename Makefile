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

.PHONY: demo compare demo-detection test test-quick env clean-venv lock help gpu-bundle

help:
	@echo "make demo   - the main job end to end on the embedded real data set"
	@echo "make compare - the five micro mixers trained, analysed and compared on the same data"
	@echo "make demo-detection - Mask R-CNN fine-tuned from the demo's weights on digits pasted on photos (COCO AP)"
	@echo "make test   - the test suite (pytest)"
	@echo "make test-quick - the tests not marked slow (iterating; CI runs make test)"
	@echo "make env    - stm-env report"
	@echo "make gpu-bundle - DeepSpeed sdist + missing wheels for the lent GPU machine (tools/gpu_check.sh)"

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

# The quick tier for iterating: everything not marked slow (no multi-process resume chains, no
# launcher/slurm integration, no wheel build). `make test` is what CI runs.
test-quick: $(VENV)/.pkg
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(VENV)/.pkg
	$(PY) -m stm_dist.cli.demo

compare: $(VENV)/.pkg
	$(PY) -m stm_dist.cli.demo --compare

# Runs `make demo` first when its export (runs/demo/model.pth) is missing.
demo-detection: $(VENV)/.pkg
	$(PY) -m stm_dist.cli.demo_detection

# Regenerate the lock from the current venv (after deliberately changing a version).
lock:
	{ grep '^#' requirements/lock.txt; $(PIP) freeze --exclude-editable | grep -v -i -E '^(deepspeed|stm-dist)=='; } > requirements/lock.tmp
	mv requirements/lock.tmp requirements/lock.txt

clean-venv:
	rm -rf $(VENV) build *.egg-info stm_dist/_C*.so

# ---- The lent GPU machine (tools/gpu_check.sh) -------------------------------------------------
# That machine has no package index, torch 2.11 on Python 3.12 x86_64, and lacks DeepSpeed and
# these of its dependencies (PLATFORM.md, the device KINDS.md list). They travel with the tree as
# `carry: ["gpu_bundle"]`; typing_extensions rides along only in case the image's copy is older
# than pydantic needs (pip keeps the installed one when it suffices). Versions come from the pins,
# so the GPU runs the same DeepSpeed and pydantic as CI.
GPU_BUNDLE := gpu_bundle
GPU_BUNDLE_MAX_BYTES := 52428800
GPU_PIP ?= python3 -m pip
GPU_DS_VERSION := $(shell sed -n 's/^deepspeed==//p' requirements/deepspeed.txt)
lock_pin = $(shell grep -i -m1 '^$(1)==' requirements/lock.txt)
GPU_WHEELS := $(call lock_pin,hjson) $(call lock_pin,pydantic) $(call lock_pin,pydantic_core) \
  $(call lock_pin,annotated-types) $(call lock_pin,typing-inspection) $(call lock_pin,typing_extensions)
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)

gpu-bundle: $(GPU_BUNDLE)/MANIFEST.txt

# Rebuilt from scratch into a temporary folder: two versions of one package side by side would
# stop the offline install there, and a half-finished download never replaces a good bundle.
$(GPU_BUNDLE)/MANIFEST.txt: requirements/deepspeed.txt requirements/lock.txt
	@test -n "$(GPU_DS_VERSION)" || { echo "gpu-bundle: no deepspeed==VERSION line in requirements/deepspeed.txt"; exit 1; }
	@test $(words $(GPU_WHEELS)) -eq 6 || { echo "gpu-bundle: requirements/lock.txt lacks a pin among hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions (found: $(GPU_WHEELS))"; exit 1; }
	rm -rf $(GPU_BUNDLE).tmp && mkdir -p $(GPU_BUNDLE).tmp
	$(GPU_PIP) download -q --no-deps --no-binary :all: -d $(GPU_BUNDLE).tmp deepspeed==$(GPU_DS_VERSION)
	$(GPU_PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_PLATFORMS) -d $(GPU_BUNDLE).tmp $(GPU_WHEELS)
	@size=$$(du -sb $(GPU_BUNDLE).tmp | cut -f1); \
	  if [ $$size -gt $(GPU_BUNDLE_MAX_BYTES) ]; then \
	    echo "gpu-bundle: $$size bytes is over the 50 MiB budget (64 MiB travel with the whole tree)"; \
	    rm -rf $(GPU_BUNDLE).tmp; exit 1; fi; \
	  echo "gpu-bundle: $$size bytes"
	cd $(GPU_BUNDLE).tmp && sha256sum * > MANIFEST.txt
	rm -rf $(GPU_BUNDLE) && mv $(GPU_BUNDLE).tmp $(GPU_BUNDLE)
	@echo "gpu-bundle: $(GPU_BUNDLE)/ ready; on the GPU: bash tools/gpu_check.sh with carry [\"$(GPU_BUNDLE)\"]"
