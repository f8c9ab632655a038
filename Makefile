PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Runs the benchmark trains at once, one process each with cores/JOBS threads.
JOBS ?= 2

.PHONY: install install-dev test test-slow benchmark lint

# The benchmark needs the package alone; the tests also need the dev extras (pytest, ruff, litdata for the
# streaming tests, which brings boto3 and friends), so `make benchmark` does not wait for those.
# pip byte-compiles each file it installs, one at a time: ~45 s of a ~2 min install on the 2-core CPU, torch's CUDA
# build bringing ~14k Python files. compileall does the same work on every core (~27 s there). Best effort, as pip's
# own is: a file that does not compile (torch ships one in Python 3.12 syntax) fails where it is imported, not here.
COMPILE = $(PYTHON) -m compileall -q -j 0 "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
	> /dev/null 2>&1 || true

install:
	$(PIP) install -q --no-compile -e .
	$(COMPILE)

install-dev:
	$(PIP) install -q --no-compile -e ".[dev]"
	$(COMPILE)

# Two phases: the tests that start processes or read the clock (marked `serial` by tests/conftest.py) alone, the
# rest on two pytest-xdist workers, a test file per worker (its module fixtures built once). Both phases always run;
# the target fails if either does.
test: install-dev
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow and not serial"; first=$$?; \
	$(PYTHON) -m pytest -q -m "not slow and serial"; second=$$?; \
	test $$first -eq 0 -a $$second -eq 0

test-slow: install-dev
	$(PYTHON) -m pytest -q -m slow

benchmark: install
	$(PYTHON) -m lightning_flows.cli benchmark --suite experiments/suites/quick.yaml --out outputs/benchmark --jobs $(JOBS)

lint: install-dev
	$(PYTHON) -m ruff check lightning_flows tests
