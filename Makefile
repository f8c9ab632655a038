PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test test-slow benchmark lint

install:
	$(PIP) install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

test-slow: install
	$(PYTHON) -m pytest -q -m slow

benchmark: install
	$(PYTHON) -m lightning_flows.cli benchmark --suite experiments/suites/quick.yaml --out outputs/benchmark

lint: install
	$(PYTHON) -m ruff check lightning_flows tests
