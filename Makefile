# pg-finetune: make setup | finetune | test | lint | eval | bench
#
# The Makefile makes and uses its own virtual environment (.venv). torch is
# installed first and pinned: on a machine without an NVIDIA GPU it asks for the
# CPU build (TORCH_VERSION, found on this machine's disk; elsewhere set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu), so the project's torch
# range is already satisfied and pip never pulls a multi-GB CUDA build.
# With nvidia-smi present it installs the default (CUDA) build of that range.

PYTHON        ?= python3
VENV          ?= .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
RECIPE        ?= recipes/tiny/easyvqa_full.yaml
ARGS          ?=
PYTEST_ARGS   ?=
HAS_GPU       := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

CHROMIUM      ?= $(shell command -v chromium || command -v chromium-browser || command -v google-chrome)
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup finetune test test-browser lint eval bench clean help

help:
	@echo "make setup                 create .venv and install pg-finetune (CPU torch unless a GPU is present)"
	@echo "make finetune [RECIPE=...] train a recipe (default: $(RECIPE), offline tiny model)"
	@echo "make test                  install what the tests need and run the suite"
	@echo "make test-browser          open report.html and detections.html in headless Chromium (installs it)"
	@echo "make lint                  ruff"
	@echo "make eval ARGS='...'       python -m eval.run ARGS (see README)"
	@echo "make bench                 benchmarks under bench/ (print a table, write JSON)"

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "torch>=2.4,<3"
else
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
endif
	$(PIP) install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

finetune: setup
	$(PY) -m pg_finetune.train --recipe $(RECIPE) $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The pages people open, in a real browser (tests/test_browser.py, marker `browser`). Pages and their
# screenshots (report.png, detections.png) stay under runs/test-browser/ to look at.
test-browser: setup
ifeq ($(strip $(CHROMIUM)),)
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium
endif
	$(PY) -m pytest -m browser -s --basetemp=runs/test-browser tests/test_browser.py $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check src tests eval bench data_prep

eval: setup
	$(PY) -m eval.run $(ARGS)

bench: setup
	$(PY) bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
