PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Runs the benchmark trains at once, one process each with cores/JOBS threads.
JOBS ?= 2

.PHONY: install test test-slow benchmark lint

install:
	$(PIP) install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

benchmark: install
	$(PYTHON) -m lightning_flows.cli benchmark --suite experiments/suites/quick.yaml --out outputs/benchmark --jobs $(JOBS)

lint: install
	$(PYTHON) -m ruff check lightning_flows tests
