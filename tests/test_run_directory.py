"""One run directory per run, whatever the logger: config, hparams, metrics, checkpoints, sample grids and the
logger's own files all under ``<root>/<name>/<version or id>/``, printed at the start and the end of the run;
``--trainer.default_root_dir`` moves all of it. Every run here starts in an empty working directory, so a file
written anywhere else would show."""

import re
from pathlib import Path

import pytest
from jsonargparse import Namespace
from subprocess_runs import ROOT, cli, python_env, run

from lightning_flows.cli import main
from lightning_flows.logger_placement import experiment_name, next_version

TOY = str(ROOT / "experiments/toy2d/flow_matching.yaml")
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.sampler.steps", "4", "--sample_grid.n", "16"]
WANDB = ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline", "true"]


def _everything_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def _announced(text: str) -> list[str]:
    """The run directories a run printed (at its start and its end)."""
    return re.findall(r"(?:Run directory: |Everything of this run is in )(\S+)", text)


def _logged(caplog) -> str:
    """What Lightning's rank-zero logger printed (pytest routes it to caplog rather than the terminal)."""
    text = "\n".join(caplog.messages)
    caplog.clear()
    return text


def _assert_one_run_dir(cwd: Path, expected_parent: Path, printed: str) -> Path:
    (run_dir,) = expected_parent.iterdir()
    files = _everything_under(run_dir)
    for needed in ("config.yaml", "checkpoints/last.ckpt", "samples/epoch0000.png", "samples/final.png"):
        assert needed in files, (needed, sorted(files))
    # Nothing outside the run directory: no runs/, lightning_logs/ or wandb/ beside it.
    # (Not resolved: wandb's debug-core.log is a link into its shared service log.)
    outside = {f for f in _everything_under(cwd) if not (cwd / f).absolute().is_relative_to(run_dir.absolute())}
    assert not outside, sorted(outside)
    assert [Path(p).resolve() for p in _announced(printed)] == [run_dir.resolve()] * 2, printed
    return run_dir


def test_csv_default_lands_in_runs_and_default_root_dir_moves_everything(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TOY, *TINY])
    run_dir = _assert_one_run_dir(tmp_path, tmp_path / "runs" / "toy2d_flow_matching", _logged(caplog))
    assert run_dir.name == "version_0"
    assert {"hparams.yaml", "metrics.csv"} <= _everything_under(run_dir)
    assert "val/loss" in (run_dir / "metrics.csv").read_text()

    # The same run elsewhere: --trainer.default_root_dir moves all of it, and runs/ gains nothing.
    before = _everything_under(tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere"
    main(["fit", "--config", TOY, *TINY, "--trainer.default_root_dir", str(elsewhere)])
    (run_dir,) = (elsewhere / "toy2d_flow_matching").iterdir()
    assert {"config.yaml", "metrics.csv", "checkpoints/last.ckpt", "samples/final.png"} <= _everything_under(run_dir)
    assert _everything_under(tmp_path / "runs") == before
    assert [Path(p).resolve() for p in _announced(_logged(caplog))] == [run_dir.resolve()] * 2


def test_tensorboard_run_directory(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    main(["fit", "--config", TOY, *TINY, "--trainer.default_root_dir", str(root),
          "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger"])
    outside_root = {f for f in _everything_under(tmp_path) if not f.startswith("root/")}
    assert not outside_root
    run_dir = _assert_one_run_dir(root, root / "toy2d_flow_matching", _logged(caplog))
    assert any(f.startswith("events.out.tfevents") for f in _everything_under(run_dir))


@pytest.fixture
def finish_wandb():
    """End the in-process wandb run after the test (the next WandbLogger would reuse it; a `lightning-flows`
    process ends it when it exits)."""
    import wandb

    wandb.finish()  # a run another test left open would be reused
    wandb.teardown()
    yield

    wandb.finish()
    wandb.teardown()  # also the service: a later run (or a subprocess inheriting WANDB_SERVICE) starts afresh


def test_wandb_offline_run_directory_holds_the_wandb_files(tmp_path, monkeypatch, capfd, caplog, finish_wandb):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # wandb must land in the run directory on its own
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # so that its warnings would show
    root = tmp_path / "root"
    main(["fit", "--config", TOY, *TINY, *WANDB, "--trainer.default_root_dir", str(root)])
    printed = capfd.readouterr()
    run_dir = _assert_one_run_dir(tmp_path, root / "toy2d_flow_matching", _logged(caplog))
    assert re.fullmatch(r"[a-z0-9]{8}", run_dir.name), run_dir.name  # the wandb run id
    (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_dir.name}")
    assert list(offline_run.glob("*.wandb"))
    # Neither the deprecated `anonymous` argument nor a missing git root makes wandb warn.
    assert "WARNING" not in printed.out + printed.err, printed.err


def test_csv_beside_wandb_shares_the_run_directory(tmp_path, monkeypatch, finish_wandb):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    loggers = ('[{"class_path": "lightning.pytorch.loggers.CSVLogger"}, '
               '{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": true}}]')
    main(["fit", "--config", TOY, *TINY, "--trainer.logger", loggers])
    (run_dir,) = (tmp_path / "runs" / "toy2d_flow_matching").iterdir()
    files = _everything_under(run_dir)
    assert {"metrics.csv", "config.yaml", "checkpoints/last.ckpt", "samples/final.png"} <= files
    assert any(f.startswith("wandb/offline-run-") and f.endswith(f"-{run_dir.name}.wandb") for f in files), files


def test_explicit_logger_locations_are_kept(tmp_path, monkeypatch):
    """A save_dir / name / version the configuration sets is used as given (the benchmark relies on it)."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TOY, *TINY, "--trainer.logger.init_args.save_dir", str(tmp_path / "mine"),
          "--trainer.logger.init_args.name", "exp", "--trainer.logger.init_args.version", "v7"])
    files = _everything_under(tmp_path)
    assert {"mine/exp/v7/metrics.csv", "mine/exp/v7/checkpoints/last.ckpt", "mine/exp/v7/config.yaml"} <= files
    assert not any(f.startswith("runs/") for f in files)


def test_a_second_run_gets_the_next_version_and_ckpt_path_last_finds_the_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", TOY, *TINY])
    main(["fit", "--config", TOY, *TINY, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    experiment = tmp_path / "runs" / "toy2d_flow_matching"
    assert sorted(p.name for p in experiment.iterdir()) == ["version_0", "version_1"]
    assert (experiment / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert next_version(experiment) == 2


@pytest.mark.parametrize(("given", "expected"), [
    ("experiments/toy2d/flow_matching.yaml", "toy2d_flow_matching"),
    ("/abs/path/experiments/digits/cnf.yaml", "digits_cnf"),
    ("mine.yaml", "mine"),
])
def test_the_experiment_name_comes_from_the_config_file(given, expected):
    assert experiment_name(Namespace(config=[given])) == expected


def test_without_a_config_file_the_name_is_dataset_and_family():
    config = Namespace(config=None, model=Namespace(class_path="lightning_flows.models.FlowMatching"),
                       data=Namespace(dataset="moons"))
    assert experiment_name(config) == "moons_flow_matching"


@pytest.mark.slow  # a feature under 2 DDP ranks, in `make test-slow` (keeps `make test` under 10 min)
@pytest.mark.timeout(600)
def test_two_ddp_ranks_write_one_run_directory_with_wandb_beside_csv(tmp_path):
    """Under DDP every rank places its loggers before any process group exists (rank 1 even draws its own wandb
    id): only rank zero may create anything, and it announces the directory once at the start and once at the end."""
    loggers = ('[{"class_path": "lightning.pytorch.loggers.CSVLogger"}, '
               '{"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": true}}]')
    env = python_env(WANDB_MODE="offline")
    env.pop("WANDB_DIR", None)
    result = run(cli("fit", "--config", TOY, *TINY, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", "--trainer.logger", loggers), timeout=540, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    experiment = tmp_path / "runs" / "toy2d_flow_matching"
    (run_dir,) = experiment.iterdir()
    files = _everything_under(run_dir)
    assert {"metrics.csv", "config.yaml", "checkpoints/last.ckpt", "samples/final.png"} <= files, sorted(files)
    assert len([f for f in files if f.endswith(".wandb")]) == 1, sorted(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    announced = _announced(result.stdout + result.stderr)
    assert [Path(tmp_path, p).resolve() for p in announced] == [run_dir.resolve()] * 2, announced
