"""Shared test fixtures: quiet, CPU-only trainers and tiny CLI overrides."""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# `make test` runs in two phases (Makefile): tests marked `serial` alone, the rest on two pytest-xdist workers. A test
# is serial if its code starts processes (DDP ranks, benchmark workers, probes), sends signals or reads the clock:
# it needs the machine's cores to itself (a rank starved by another worker's test could miss a timeout, a timer
# would time the neighbour). "Its code" is the test function, every fixture it uses and the functions of ours they
# call (two calls deep): matching the source, not a list, keeps new tests safe.
SERIAL_SOURCE = re.compile(r"subprocess|gloo_ranks|_probe|devices=2|devices\", \"2|\"--jobs\"|os\.kill|signal\.|"
                           r"Popen|multiprocessing|mp\.spawn|\bjobs=[2-9]|time\.sleep|max_time|perf_counter|monotonic|"
                           r"train_time")
TESTS = Path(__file__).resolve().parent


def _our_functions(function, depth: int):
    """``function`` and the functions and classes of tests/ it names (module globals), ``depth`` calls deep."""
    seen, frontier = [], [function]
    for _ in range(depth + 1):
        following = []
        for candidate in frontier:
            candidate = inspect.unwrap(candidate)
            if candidate in seen or not (inspect.isfunction(candidate) or inspect.isclass(candidate)):
                continue
            try:
                if not Path(inspect.getsourcefile(candidate)).resolve().is_relative_to(TESTS):
                    continue
            except TypeError:
                continue
            seen.append(candidate)
            if inspect.isclass(candidate):  # a helper class of the tests (a slow loader): its source, not its calls
                continue
            names = candidate.__code__.co_names + tuple(
                name for const in candidate.__code__.co_consts if inspect.iscode(const) for name in const.co_names)
            following += [candidate.__globals__[name] for name in names if name in candidate.__globals__]
        frontier = following
    return seen


@functools.lru_cache(maxsize=None)
def _is_serial_function(function) -> bool:
    """One test or fixture function (and what of ours it calls): read once, though hundreds of items share their
    function (parametrized tests) or a fixture."""
    return any(SERIAL_SOURCE.search(inspect.getsource(ours)) for ours in _our_functions(function, depth=2))


def is_serial_code(functions) -> bool:
    """Whether any of ``functions`` (a test, its fixtures), or what of ours they call, starts processes, sends
    signals or reads the clock."""
    return any(_is_serial_function(function) for function in functions)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not hasattr(item, "function"):
            continue
        fixtures = [definition.func for definitions in item._fixtureinfo.name2fixturedefs.values()
                    for definition in definitions]
        if is_serial_code([item.function, *fixtures]):
            item.add_marker(pytest.mark.serial)


if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one intra-op thread each
    import torch

    torch.set_num_threads(1)


def quiet_fit_args(tmp_path, *extra: str) -> list[str]:
    """CLI overrides that keep a test run small, quiet and inside ``tmp_path``."""
    return ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", *extra]


@pytest.fixture
def fit_args(tmp_path):
    return lambda *extra: quiet_fit_args(tmp_path, *extra)


ROOT = Path(__file__).resolve().parents[1]


def _tiny_fit(config: str, tmp_path: Path, *extra: str):
    """Fit ``config`` for two batches with one validation pass; returns the LightningCLI object."""
    from lightning_flows.cli import build_cli

    out = str(tmp_path)
    return build_cli(["fit", "--config", str(ROOT / config), "--trainer.max_epochs", "1",
                      "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                      "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
                      "--trainer.default_root_dir", out, "--trainer.logger.init_args.save_dir", out,
                      "--trainer.num_sanity_val_steps", "0", "--sample_grid.n", "16", *extra])


@pytest.fixture
def tiny_fit():
    """``tiny_fit(config, tmp_path, *overrides)``: a two-batch CLI fit of one experiment config."""
    return _tiny_fit
