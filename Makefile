# MiniFusion — the two commands (`make train`, `make test`) set themselves up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
# Exact versions of every dependency, transitive ones included; `make lock` renews it.
LOCK   := requirements/lock.txt
PRESET ?= tiny
OUT    ?= runs/$(PRESET)
PIP    := --quiet --disable-pip-version-check

export PATH := $(BIN):$(PATH)
export TOKENIZERS_PARALLELISM := false
# Compiled extensions (DeepSpeed's CPU communication op) are built inside this checkout's
# environment, so no other checkout's half-finished build can block ours.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup lock train test test-latest latest-env lint extensions unit notebooks notebooks-kernels browser execute corpus bench lab clean

setup: $(STAMP)  ## create .venv and install the locked versions (reused when up to date)

# torch==2.13.0 in the lock is the CPU wheel where pip is offered one (this build machine) and
# PyPI's CUDA wheel on GPU machines: the same version, another build; every other pin is shared.
$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "setup: '$(PYTHON)' is not Python 3.11 or newer, which the locked versions need (numpy 2.4)."; \
	  echo "       Run 'make setup PYTHON=python3.11', or see 'If the install fails' in README.md."; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing the locked versions from $(LOCK) (a few minutes the first time)"
	@$(BIN)/python -m pip install $(PIP) -r $(LOCK) || { \
	  echo "setup: installing from $(LOCK) failed; see 'If the install fails' in README.md"; exit 1; }
	@$(BIN)/python -m pip install $(PIP) --no-deps -e .
	@touch $(STAMP)

# Resolve pyproject.toml's ranges (+ the dev and finetune extras, + requirements/constraints.in) to the newest
# releases that fit, with pip-tools in a throwaway environment. Commit the result.
lock:  ## regenerate requirements/lock.txt from pyproject.toml
	@test -x .venv-lock/bin/python || $(PYTHON) -m venv .venv-lock
	@.venv-lock/bin/python -m pip install $(PIP) "pip-tools==7.6.2"
	.venv-lock/bin/pip-compile --quiet --upgrade --extra dev --extra finetune --strip-extras --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links --constraint requirements/constraints.in \
	  --output-file $(LOCK) pyproject.toml
	@# A local build label (+cpu) would stop a GPU machine from taking the CUDA wheel.
	@sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$$/\1/' $(LOCK)
	@echo "lock: wrote $(LOCK); run 'make test' before committing it"

# Corpus → tokenizer → token files → training → evaluation → loss curve → sample → checkpoint
# and a Hugging Face export, all in $(OUT). Running it again resumes; FRESH=1 starts over.
# With CUDA GPUs: torchrun on all of them, DeepSpeed ZeRO-2, the `small` preset (GPU_PRESET).
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPU_PRESET ?= small
train: setup  ## the main job: train the default preset (CPU: about two minutes)
ifeq ($(NGPU),0)
	$(BIN)/python -m minifusion.train --config configs/$(PRESET).yaml --out $(OUT) $(if $(FRESH),--fresh)
else
	$(BIN)/torchrun --standalone --nproc_per_node=$(NGPU) -m minifusion.train \
	  --config configs/$(GPU_PRESET).yaml --out runs/$(GPU_PRESET) \
	  --deepspeed configs/deepspeed/zero2.json $(if $(FRESH),--fresh)
endif

test: setup lint unit notebooks notebooks-kernels browser  ## everything CI runs

lint: setup
	$(BIN)/ruff check .

# DeepSpeed's CPU extension is built once up front (about a minute the first time), not
# inside the time limit of the first test or notebook that launches torchrun.
extensions: setup
	$(BIN)/python -c "from minifusion.extensions import build_extensions; build_extensions()"

# Hub access is switched off for tests: everything they read is local or comes from PyPI.
# The browser test has its own target (below), so it does not run here a second time.
# --durations=20 (here, in the notebook passes and in test-latest): each run's log names its
# slowest tests, so a CI run that creeps towards its time limit shows where the time went.
# OMP_NUM_THREADS=1 (here and in test-latest, as in the notebook passes): two workers that each
# start one thread per core oversubscribe the cores, and the tests' many small tensor operations
# then wait at OpenMP barriers for a thread that is not running. On 2 cores the suite took
# 368 s with one thread per worker against 468-553 s without (one fp16 training test: 53 s
# in CI, 2.5 s on its own). Tests that measure threads set them themselves.
unit: extensions
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg \
	  $(BIN)/python -m pytest -n 2 --dist loadscope --durations=20 -m "not browser" tests

# JupyterLab in headless Chromium (tests/test_browser.py, about a minute): chapter 04 runs from
# the menu without an error, its slider changes the output tied to it, its links open, and the
# browser console stays clean. Skipped, with the reason (-rs), without Chromium and chromedriver
# (Debian: apt-get install chromium chromium-driver; .ci/run installs them).
browser: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest -p no:cacheprovider -rs -m browser tests/test_browser.py

# The corpus is fetched (and matplotlib's font cache built) before the notebooks run, so no
# notebook prints a one-off download message that its committed outputs do not contain.
corpus: setup  # fetch the corpus and build matplotlib's font cache once, before any notebook
	$(BIN)/python -c "import matplotlib.pyplot; from minifusion.data import fetch_shakespeare; fetch_shakespeare(verbose=True)"

NBVAL := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  $(BIN)/python -m pytest -n 2 --dist loadscope -p no:cacheprovider --durations=20 \
  --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
notebooks: extensions corpus
	$(NBVAL) notebooks/*.ipynb chapters/*/solutions.ipynb

# Re-run notebooks in place, refreshing their committed outputs (NB=... for a subset); the
# outputs are then what `make notebooks` compares against. Run it after changing the package.
# A second pass merges each cell's consecutive prints into one output (nbconvert coalesces
# before it executes), so JupyterLab does not write them back doubled when it saves a notebook.
NB ?= notebooks/*.ipynb chapters/*/solutions.ipynb
NBCONVERT := $(BIN)/jupyter nbconvert --to notebook --inplace --log-level=WARN
execute: extensions corpus  ## re-execute the notebooks (NB=...) and save their outputs
	printf '%s\n' $(NB) | OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  xargs -P 2 -I{} sh -c '$(NBCONVERT) --execute --ExecutePreprocessor.timeout=1200 "$$1" && \
	  $(NBCONVERT) --coalesce-streams "$$1"' _ {}

# The committed outputs must hold on any x86 CPU, not only this one: PyTorch picks its SIMD
# kernels at run time (AVX-512 here, AVX2 on most laptops and cloud VMs, plain C++ where neither
# is available), and their float sums differ in the last bits. A second pass under the AVX2
# kernels catches a digit printed finer than it holds; `make notebooks-kernels KERNELS=default`
# checks the plain kernels the same way (run it before committing re-executed notebooks).
KERNELS ?= avx2
NBVAL_KERNELS ?= notebooks/*.ipynb chapters/*/solutions.ipynb
notebooks-kernels: extensions
	ATEN_CPU_CAPABILITY=$(KERNELS) $(NBVAL) $(NBVAL_KERNELS)

# A second environment with the newest releases beyond pyproject.toml's caps (next major
# version; torch stays at the locked build), running the unit tests that need no torchrun and
# are not marked slow (long training runs and subprocess round trips: `make unit` runs those)
# or browser (`make browser` runs it).
# It tells the day an upstream release breaks us; fix minifusion/compat.py, then raise the cap.
LATEST := .venv-latest
# LATEST_INSTALL= skips the install step, for a caller that has just run `make latest-env`
# (.ci/run installs it in the background while `make test` runs).
LATEST_INSTALL ?= latest-env
test-latest: $(LATEST_INSTALL)  ## unit tests against the newest releases of every dependency
	@test -x $(LATEST)/bin/python || { echo "test-latest: $(LATEST) is missing; run 'make latest-env'"; exit 1; }
	@$(LATEST)/bin/python -m minifusion  # the versions under test, in the log
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg TORCH_EXTENSIONS_DIR=$(abspath $(LATEST))/torch_extensions \
	  $(LATEST)/bin/python -m pytest -n 2 --dist loadscope -p no:cacheprovider --durations=20 -m "not distributed and not slow and not browser" tests

# Its environment, on its own: CI installs it (mostly downloads) while `make test` keeps the CPUs
# busy. Running it again upgrades whatever has had a release since.
latest-env:
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	@$(LATEST)/bin/python -m pip install $(PIP) --upgrade pip
	$(LATEST)/bin/python requirements/latest.py > $(LATEST)/requirements.txt
	$(LATEST)/bin/python -m pip install $(PIP) --upgrade --upgrade-strategy eager -r $(LATEST)/requirements.txt
	@$(LATEST)/bin/python -m pip install $(PIP) --no-deps -e .

# Scans, attention, MoE dispatch, training MFU, decode and cache memory (+ bench/why_hybrid.py
# where present), on CUDA if there is a GPU; the other device's columns in RESULTS.md are kept.
# On a CPU also the equal wall-clock training race (bench/race.py: 7 models × 240 s, ~35 min).
bench: setup  ## every benchmark → bench/RESULTS.md and the README's results section
	$(BIN)/python -m bench

# The server's root is the repository, so the chapters' links to ../assets and ../chapters
# resolve; the browser opens on the notebooks folder. Containers run as root: allow it there.
lab: setup  ## open the chapters in JupyterLab
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

clean:  ## remove the environment and generated files (the corpus cache in ~/.cache stays)
	rm -rf $(VENV) $(LATEST) .venv-lock runs .pytest_cache .ruff_cache .hypothesis
