# Two commands on a fresh machine: `make run` (the whole pipeline on the embedded MNIST-5k) and `make test`.
SHELL  := /bin/bash
# Both create or refresh the virtual env first; re-running them is safe.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sslcook-installed

# Keep every tool local to the workspace and offline by default.
export DVC_NO_ANALYTICS := 1
export WANDB_MODE ?= offline
export WANDB_DIR := $(CURDIR)/.wandb
export WANDB_CACHE_DIR := $(CURDIR)/.wandb/cache
export WANDB_CONFIG_DIR := $(CURDIR)/.wandb/config
export WANDB_DATA_DIR := $(CURDIR)/.wandb/data
export WANDB_SILENT := true
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# dvc.yaml runs `python -m stages.X`: make it the venv's python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test test-unit test-integration bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing sslcook and its dependencies into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@set -o pipefail; $(PY) -m pip install -q -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	@mkdir -p $(WANDB_DIR) && touch $@

# RUN_ARGS: extra `sslcook run` options, e.g. `make run RUN_ARGS=--force` re-runs every stage
RUN_ARGS ?=

run: setup
	$(VENV)/bin/sslcook run $(RUN_ARGS)

# everything; .ci/run runs the same tests as two tiers: test-unit, then test-integration
# the unit tier first, for fast feedback, then the integration tier (CI runs exactly this)
test: setup
	$(PY) -m pytest -q -m "not integration"
	$(PY) -m pytest -q -m integration

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

# real DVC pipelines, Prefect servers, SIGKILL resumes, DDP/torchrun subprocesses
test-integration: setup
	$(PY) -m pytest -q -m integration

bench: setup
	@set -o pipefail; $(PY) -m pip install -q -e '.[dev,bench]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(PY) -m bench.run_all

clean:
	rm -rf runs models metrics reports data/shards .wandb .prefect
