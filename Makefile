# The two quick-start commands: `make demo` (set up, screen sample DICOMs) and `make test` (set up, run the checks).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

.PHONY: setup demo test check bench

setup: $(VENV)/.installed

# torch/torchvision are named first at the exact releases the build machines hold on disk, so pip never pulls a
# multi-gigabyte download; everything else comes from pyproject.toml.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/neuron samples samples
	$(BIN)/neuron run samples --out results --weights untrained

# ruff, then the layer contracts of pyproject.toml's [tool.importlinter] (which package may import which; no import
# circles inside a package)
check: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# Two pytest processes, each taking whole test modules (a module's fixtures, servers and workers stay in one process),
# the longest modules first (tests/conftest.py): most tests wait on servers, workers and timeouts for much of their
# time, so two of them share the two cores of a CI machine.
test: check
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=30

# Small N for this CPU; on a GPU machine: neuron bench --device cuda --n 2048 (see BENCHMARKS.md).
bench: setup
	$(BIN)/neuron bench --n 32 --size 1024
