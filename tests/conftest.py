"""Shared test fixtures: quiet, CPU-only trainers and tiny CLI overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


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
