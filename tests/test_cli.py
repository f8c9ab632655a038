"""The command line end to end: fit -> checkpoint -> samples on disk; loggers; clear errors."""

import glob
from pathlib import Path

import pytest

from lightning_flows.cli import main

TOY = "experiments/toy2d/flow_matching.yaml"
DIGITS = "experiments/digits/flow_matching.yaml"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--model.init_args.sampler.steps", "4"]


def _only(pattern: str) -> Path:
    matches = glob.glob(pattern, recursive=True)
    assert len(matches) == 1, f"expected one match for {pattern}, got {matches}"
    return Path(matches[0])


@pytest.mark.parametrize("config", [TOY, DIGITS])
def test_fit_writes_checkpoint_and_sample_png_then_sample_command_draws_a_grid(tmp_path, fit_args, config):
    main(["fit", "--config", config, *fit_args(*TINY, "--sample_grid.n", "16")])
    checkpoint = _only(f"{tmp_path}/**/checkpoints/*.ckpt")
    png = _only(f"{tmp_path}/**/samples/epoch0000.png")
    assert png.stat().st_size > 500
    assert "val/loss" in (checkpoint.parent.parent / "metrics.csv").read_text()

    out = tmp_path / "grid.png"
    main(["sample", "--ckpt", str(checkpoint), "--n", "16", "--out", str(out)])
    from PIL import Image

    width, height = Image.open(out).size
    assert width > 100 and height > 100


def test_test_subcommand_reports_the_shared_evaluation(tmp_path, fit_args):
    # An untrained field is stiff for dopri5: a fixed-step likelihood solve keeps the test quick.
    main(["test", "--config", TOY, *fit_args(*TINY, "--trainer.limit_test_batches", "1",
                                             "--model.init_args.likelihood_solver", '{"method": "rk4", "steps": 8}',
                                             "--evaluation.spec.n_samples", "200", "--evaluation.spec.progress",
                                             "false")])
    metrics = _only(f"{tmp_path}/**/metrics.csv").read_text()
    for name in ("test/loss", "test/nll_exact", "test/nll_gap_exact", "test/energy_distance", "test/precision",
                 "test/modes_hit", "test/nfe_per_sample", "test/ms_per_sample"):
        assert name in metrics, name


def test_wandb_logger_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    main(["fit", "--config", TOY, *TINY, "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.offline", "true",
          "--trainer.logger.init_args.project", "lightning-flows-test"])
    run_dirs = glob.glob(f"{tmp_path}/**/offline-run-*", recursive=True)
    assert run_dirs, "wandb wrote no offline run (sync it later with `wandb sync <dir>`)"
    assert glob.glob(f"{run_dirs[0]}/**/*.wandb", recursive=True)


def test_tensorboard_logger_receives_sample_images(tmp_path):
    main(["fit", "--config", TOY, *TINY, "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false",
          "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
          "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert glob.glob(f"{tmp_path}/**/events.out.tfevents.*", recursive=True)
    assert glob.glob(f"{tmp_path}/**/samples/epoch0000.png", recursive=True)


def test_image_backbone_on_2d_data_is_a_clear_error(tmp_path, fit_args):
    with pytest.raises(SystemExit, match=r"^error: TimeUNet needs image data.*\(2,\).*backbone: mlp"):
        main(["fit", "--config", TOY, *fit_args(*TINY, "--model.init_args.backbone", "unet")])


def test_unknown_dataset_from_the_cli_is_a_clear_error(tmp_path, fit_args):
    with pytest.raises(SystemExit, match="^error: Unknown dataset 'eightgaussians'. Choose one of: 2spirals, "):
        main(["fit", "--config", TOY, *fit_args(*TINY, "--data.dataset", "eightgaussians")])


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="Could not read checkpoint .*broken.ckpt.*corrupt"):
        main(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["sample", "--ckpt", str(tmp_path / "missing.ckpt")])


def test_every_cli_run_has_the_non_finite_guard_and_sample_grid(tmp_path):
    from lightning_flows.callbacks import NonFiniteGuard, SampleGridCallback
    from lightning_flows.cli import build_cli

    cli = build_cli(["--config", TOY, "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger.init_args.save_dir", str(tmp_path), "--non_finite_guard.max_consecutive", "3"],
                    run=False)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1 and guards[0].max_consecutive == 3
    assert any(isinstance(c, SampleGridCallback) for c in cli.trainer.callbacks)
