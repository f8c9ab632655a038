"""Shared test fixtures: quiet, CPU-only trainers and tiny CLI overrides."""

from __future__ import annotations

import os

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
