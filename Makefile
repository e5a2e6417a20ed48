# Two commands from a fresh clone:  make demo   and   make test
# Each creates .venv and installs the project on first use. On a machine without an NVIDIA GPU the CPU
# build of torch is pinned (TORCH=...) so pip does not pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH ?= torch>=2.4
EXTRAS ?= dev,gpu
else
TORCH ?= torch==2.13.0
EXTRAS ?= dev
endif

.PHONY: demo test lint typecheck unit browser clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fuyou-ray train configs/demo.yaml $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check fuyou_ray actors tests examples
	$(BIN)/ruff format --check fuyou_ray actors tests examples

typecheck: $(BIN)/.installed
	$(BIN)/mypy fuyou_ray actors

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not gpu" tests $(PYTEST_ARGS)

# The browser tests' chromium (Debian's) and playwright-core; where they truly cannot be installed the
# script prints "SKIP browser tests: <why>" and those tests skip with that reason.
browser:
	.ci/install-browser.sh

test: lint typecheck browser unit

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
