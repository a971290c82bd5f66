PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all bench clean

install:  ## create .venv and install nnctl with its dev extras
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'

test:  ## the fast offline suite
	$(BIN)/pytest -q -n 2

test-all:  ## everything, including slow real-data runs
	$(BIN)/pytest -q -n 2 -m ''

bench:  ## benchmarks; writes bench/RESULTS.md (BENCH_ARGS=--quick for a fast check)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf outputs .pytest_cache
