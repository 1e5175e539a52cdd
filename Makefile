# AstrID: the two commands a new user needs.
#   make demo   install everything and run the main job on the embedded default
#   make test   install what the tests need and run them (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= astrid-demo

.PHONY: demo test install install-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"

demo: install
	$(BIN)/astrid demo --output $(DEMO_DIR)

test: install-test
	$(BIN)/ruff check src bench
	$(BIN)/mypy
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --durations=15

lint: install-test
	$(BIN)/ruff check src bench
	$(BIN)/ruff format --check src bench
	$(BIN)/mypy

bench: install-test
	$(BIN)/python bench/bench_chain.py

clean:
	rm -rf $(DEMO_DIR) bench/out .pytest_cache .mypy_cache .ruff_cache
