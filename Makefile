# The two set-up commands of the README. Each creates .venv if it is missing, installs neox and
# its dependencies (again only when pyproject.toml, setup.py or csrc/ changed), then runs.
#   make train   trains the default (tiny model, embedded corpus) on this machine
#   make test    runs the whole test suite (starting a local Slurm for its tests)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neox-installed
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
export MAX_JOBS ?= 2

.PHONY: train test install
train: $(STAMP)
	$(PY) launch.py $(ARGS)

# Two pytest-xdist workers: the Slurm tests mostly wait on the scheduler and one-process tests leave a
# core idle; tests/conftest.py keeps the tests that share a trained run on one worker, slowest first.
PYTEST_WORKERS ?= -n 2 --no-loadscope-reorder
test: $(STAMP)
	bash .ci/slurm.sh start || echo "local Slurm not started: the Slurm tests skip (and fail under CI=true)"
	set -o pipefail; $(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@touch $@
