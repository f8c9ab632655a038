"""Nothing is lost when a run stops: every stop leaves last.ckpt (the final weights) and a final sample grid.

Faults injected: a stop by max_steps before the first validation, by max_time, SIGTERM (as SLURM sends on
preemption) and Ctrl-C to a running process, SIGTERM to every process of a 2-rank DDP job, an exception and a
SIGKILL in the middle of writing a checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from subprocess_runs import ROOT, cli, processes_in_group, python_env

from lightning_flows.callbacks.checkpointing import AtomicCheckpointIO, RunCheckpoint, atomic_torch_save
from lightning_flows.checkpoints import load_model_and_data
from lightning_flows.cli import main

TOY = str(ROOT / "experiments/toy2d/flow_matching.yaml")
SMALL = ["--model.init_args.hidden", "32", "--model.init_args.sampler.steps", "4", "--sample_grid.n", "64",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu"]


def _dirs(tmp_path: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]


def _last_and_final(tmp_path: Path) -> tuple[Path, Path]:
    (last,) = tmp_path.glob("**/checkpoints/last.ckpt")
    (final,) = tmp_path.glob("**/samples/final.png")
    return last, final


def _step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


def test_max_steps_before_the_first_validation_leaves_last_ckpt_and_final_samples(tmp_path):
    # The case: check_val_every_n_epoch is 5, so 30 steps never validate and used to leave nothing.
    main(["fit", "--config", TOY, *SMALL, *_dirs(tmp_path), "--trainer.max_steps", "30"])
    last, final = _last_and_final(tmp_path)
    assert _step_of(last) == 30 and final.stat().st_size > 1000
    assert not list(tmp_path.glob("**/samples/epoch*.png"))  # no validation ran: the grid is the final one
    # The checkpoint is a complete one: `lightning-flows sample` rebuilds the model from it.
    model, datamodule = load_model_and_data(last)
    assert model.sample(8).shape == (8, 2)


def test_sample_grid_n_zero_turns_the_pictures_off_but_not_the_checkpoint(tmp_path):
    main(["fit", "--config", TOY, *SMALL, *_dirs(tmp_path), "--trainer.max_steps", "3", "--sample_grid.n", "0"])
    assert list(tmp_path.glob("**/checkpoints/last.ckpt")) and not list(tmp_path.glob("**/*.png"))


def test_max_time_leaves_last_ckpt_and_final_samples(tmp_path):
    main(["fit", "--config", TOY, *SMALL, *_dirs(tmp_path), "--trainer.max_epochs", "-1",
          "--trainer.max_time", "00:00:00:02"])
    last, final = _last_and_final(tmp_path)
    assert _step_of(last) > 0 and final.exists()


def test_every_cli_run_checkpoints_atomically_with_a_run_checkpoint(tmp_path):
    from lightning_flows.training import build_cli

    cli_ = build_cli(["--config", TOY, *_dirs(tmp_path)], run=False)
    assert sum(isinstance(c, RunCheckpoint) for c in cli_.trainer.callbacks) == 1
    checkpoint = cli_.trainer.checkpoint_callback
    assert checkpoint.save_last and checkpoint._every_n_train_steps == 1000  # by default
    main(["fit", "--config", TOY, *SMALL, *_dirs(tmp_path / "run"), "--trainer.max_steps", "2",
          "--trainer.enable_checkpointing", "false"])  # checkpointing can still be turned off
    assert not list((tmp_path / "run").glob("**/*.ckpt"))


def _start(tmp_path: Path, *extra: str, new_session: bool = False) -> subprocess.Popen:
    marker = tmp_path / "marker"
    command = cli("fit", "--config", TOY, *SMALL, *_dirs(tmp_path), "--trainer.max_steps", "100000",
                  "--trainer.max_epochs", "-1", "--trainer.callbacks+=fault_injection.SlowDownFromStep",
                  "--trainer.callbacks.step", "5", "--trainer.callbacks.marker", str(marker), *extra)
    process = subprocess.Popen(command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=new_session)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training did not reach step 5:\n{process.communicate()[0][-3000:]}")
        time.sleep(0.1)
    return process


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl_c"])
def test_a_signal_stops_at_a_batch_boundary_and_saves_last_ckpt_and_final_samples(tmp_path, signum):
    process = _start(tmp_path)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)  # stops promptly, not after 100000 steps
    last, final = _last_and_final(tmp_path)
    assert 5 <= _step_of(last) < 100, output[-3000:]
    assert final.exists()
    assert "saved" in output and "--ckpt_path last" in output  # the message says how to resume
    load_model_and_data(last)


@pytest.mark.timeout(240)
def test_sigterm_to_every_rank_of_a_ddp_job_saves_once_and_every_process_exits(tmp_path):
    # SLURM signals every task of a preempted job: the whole process group gets SIGTERM.
    process = _start(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp", new_session=True)
    os.killpg(process.pid, signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    last, final = _last_and_final(tmp_path)
    assert 5 <= _step_of(last) < 100, output[-3000:]
    assert "Traceback" not in output  # every rank left at the same batch: no collective left unmatched
    deadline = time.monotonic() + 30
    while processes_in_group(process.pid):
        assert time.monotonic() < deadline, "a rank is still running 30 s after the launcher exited"
        time.sleep(0.2)


class _FailsHalfwayThrough:
    """Pickles partway, then raises: a crash in the middle of writing a checkpoint."""

    def __reduce__(self):
        raise OSError("disk full")


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_readable(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"state_dict": {"w": torch.zeros(1_000_000)}, "later": _FailsHalfwayThrough()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def _rewrite_forever(path: str) -> None:
    io, step = AtomicCheckpointIO(), 0
    while True:
        step += 1
        io.save_checkpoint({"global_step": step, "w": torch.full((2_000_000,), float(step))}, path)
        if step == 2:
            Path(path + ".started").touch()


@pytest.mark.timeout(300)
def test_sigkill_in_the_middle_of_saving_leaves_a_complete_checkpoint(tmp_path):
    # A process rewriting an 8 MB checkpoint in a loop, killed at arbitrary moments: many kills land mid-write; the
    # file on disk must always be one complete checkpoint. Where a kill lands depends on the machine's disk speed
    # (CI once saw three kills in a row land between writes), so the test kills again, at other moments, until two
    # kills have landed mid-write, checking the file after every kill.
    path = tmp_path / "last.ckpt"
    killed_mid_write, kills = 0, 0
    delays = (0.05, 0.13, 0.31, 0.02, 0.21, 0.08, 0.17, 0.27, 0.04, 0.11, 0.23, 0.15)
    while killed_mid_write < 2 and kills < len(delays):
        # spawn, not fork: a forked child of a process whose OpenMP pool has run can deadlock in torch ops.
        writer = multiprocessing.get_context("spawn").Process(target=_rewrite_forever, args=(str(path),))
        writer.start()
        while not Path(str(path) + ".started").exists():
            assert writer.is_alive()
            time.sleep(0.01)
        time.sleep(delays[kills])
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        kills += 1
        checkpoint = torch.load(path, weights_only=True)
        assert torch.equal(checkpoint["w"], torch.full((2_000_000,), float(checkpoint["global_step"])))
        Path(str(path) + ".started").unlink()
        killed_mid_write += bool(list(tmp_path.glob(".last.ckpt.*.tmp")))  # a half-written temporary file
    assert killed_mid_write, f"none of {kills} kills landed during a write; the test proved nothing"
    # The next save cleans up what killed writers left behind.
    AtomicCheckpointIO().save_checkpoint({"global_step": 0}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_atomic_io_is_what_the_trainer_writes_with(tmp_path):
    from lightning_flows.training import build_cli

    cli_ = build_cli(["fit", "--config", TOY, *SMALL, *_dirs(tmp_path), "--trainer.max_steps", "2"])
    assert isinstance(cli_.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- `--ckpt_path last` after a kill: the furthest complete checkpoint, no temporary files left ----
@pytest.fixture(scope="module")
def run_killed_while_saving_last(tmp_path_factory):
    """A 4-step run with periodic checkpoints at steps 2 and 4, turned into what a SIGKILL during the step-4 save
    of last.ckpt leaves: step=4.ckpt written, last.ckpt still the step-2 state (older), and the half-written
    temporary file of the dead writer."""
    root = tmp_path_factory.mktemp("killed")
    main(["fit", "--config", TOY, *SMALL, *_dirs(root), "--trainer.max_steps", "4",
          "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1", "--sample_grid.n", "0"])
    checkpoints = root / "toy2d_flow_matching" / "version_0" / "checkpoints"
    step2, step4, last = (checkpoints / "epoch=0-step=2.ckpt", checkpoints / "epoch=0-step=4.ckpt",
                          checkpoints / "last.ckpt")
    last.write_bytes(step2.read_bytes())
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone
    temporary = checkpoints / f".last.ckpt.{dead.pid}.0123abcd.tmp"
    temporary.write_bytes(step4.read_bytes()[:1000])
    for age, path in ((300, step2), (200, last), (100, step4), (100, temporary)):
        os.utime(path, (time.time() - age, time.time() - age))
    return root


def _copy_tree(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target, copy_function=shutil.copy2)  # copy2 keeps the modification times
    return target


def _resume_last(root: Path, max_steps: int = 6) -> Path:
    main(["fit", "--config", TOY, *SMALL, *_dirs(root), "--trainer.max_steps", str(max_steps),
          "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1", "--sample_grid.n", "0",
          "--ckpt_path", "last"])
    return root / "toy2d_flow_matching" / "version_1" / "checkpoints"


def test_ckpt_path_last_after_a_kill_resumes_from_the_newest_complete_checkpoint(run_killed_while_saving_last,
                                                                                  tmp_path):
    root = _copy_tree(run_killed_while_saving_last, tmp_path / "runs")
    killed = root / "toy2d_flow_matching" / "version_0" / "checkpoints"
    live = killed / f".last.ckpt.{os.getpid()}.89abcdef.tmp"  # a writer that still runs: left alone
    live.write_bytes(b"")
    resumed = _resume_last(root)
    # From step 4 the resumed run trains steps 5-6 only: it writes step 6, never step 4 again.
    assert sorted(p.name for p in resumed.glob("*.ckpt")) == ["epoch=0-step=6.ckpt", "last.ckpt"]
    assert _step_of(resumed / "last.ckpt") == 6
    assert [p.name for p in killed.glob(".*.tmp")] == [live.name]  # the dead writer's file is gone


def test_ckpt_path_last_goes_by_training_progress_not_by_file_times(run_killed_while_saving_last, tmp_path):
    """A copied run directory (cp, rsync without -t) gets new file times: the step-2 file can look newest."""
    root = _copy_tree(run_killed_while_saving_last, tmp_path / "runs")
    killed = root / "toy2d_flow_matching" / "version_0" / "checkpoints"
    os.utime(killed / "epoch=0-step=2.ckpt")  # now
    (killed / "broken.ckpt").write_bytes((killed / "epoch=0-step=4.ckpt").read_bytes()[:5000])  # a copy cut short
    os.utime(killed / "broken.ckpt")
    with pytest.warns(UserWarning, match=r"Skipping checkpoints that cannot be read: .*broken.ckpt"):
        resumed = _resume_last(root)
    assert sorted(p.name for p in resumed.glob("*.ckpt")) == ["epoch=0-step=6.ckpt", "last.ckpt"]
