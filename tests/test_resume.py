"""Resume is exact: a run killed with SIGKILL mid-epoch and restarted with ``--ckpt_path last`` ends with the
weights of an uninterrupted run with the same seed (CPU, to 1e-6): optimizer, EMA, random numbers, data
order and dequantisation noise included.

Fault injected: SIGKILL to a training process right after it passed a checkpoint, mid-epoch, mid-way
between validations.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from subprocess_runs import ROOT, cli, python_env

from lightning_flows.cli import main
from lightning_flows.data import GenerativeDataModule

RUNS = {
    # Digits: dequantisation noise, 22 batches per epoch (the run crosses an epoch boundary after the
    # kill), flow matching's x0 and t from the RNG, EMA weights (the config's callback at decay 0.9),
    # validation (which draws noise too) at steps 10 and 20, checkpoints every 5 steps; killed at step 17.
    "digits_flow_matching_ema": (
        "experiments/digits/flow_matching.yaml", 30, 5, 17,
        ["--model.init_args.backbone", "mlp", "--model.init_args.hidden", "32", "--model.init_args.depth", "2",
         "--model.init_args.sampler.steps", "4", "--data.batch_size", "64",
         "--trainer.callbacks.decay", "0.9",  # the config's EMACallback
         "--trainer.check_val_every_n_epoch", "1", "--trainer.val_check_interval", "10",
         "--trainer.limit_val_batches", "2"]),
    # GAN: two optimizers (a batch is two steps), the generator's z and the R1 penalty, EMA from the config.
    "toy2d_gan": (
        "experiments/toy2d/gan.yaml", 40, 10, 24,
        ["--model.init_args.hidden", "32", "--data.batch_size", "64", "--trainer.limit_val_batches", "0"]),
}


def _args(config: str, max_steps: int, every: int, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / config), "--trainer.max_steps", str(max_steps),
            "--checkpoint.every_n_train_steps", str(every), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
            "--sample_grid.n", "16", *extra]


@pytest.fixture
def one_thread():
    """Same float summation order as the single-threaded subprocess."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_close(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=lambda m: f"{where}: {m}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", RUNS)
def test_sigkill_then_ckpt_path_last_ends_where_an_uninterrupted_run_ends(tmp_path, one_thread, name):
    config, max_steps, every, kill_at, extra = RUNS[name]
    # The run to match, uninterrupted.
    main(_args(config, max_steps, every, tmp_path / "straight", *extra))

    # The same run, killed right after passing step `kill_at` (the last checkpoint is `kill_at // every`).
    killed = tmp_path / "killed"
    marker = tmp_path / "at_kill_step"
    process = subprocess.Popen(
        cli(*_args(config, max_steps, every, killed, *extra, "--trainer.callbacks+=fault_injection.PauseAtStep",
                   "--trainer.callbacks.step", str(kill_at), "--trainer.callbacks.marker", str(marker))),
        env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(process.communicate()[0][-3000:])
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs, nothing is saved on the way out
    process.wait()
    (last_before_kill,) = killed.glob("*/version_0/checkpoints/last.ckpt")
    saved = torch.load(last_before_kill, weights_only=True)
    assert saved["global_step"] == (kill_at // every) * every < kill_at
    (loader_state,) = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert 0 < loader_state["position"]  # mid-epoch

    # Restart from the newest last.ckpt of the experiment (a new version directory).
    main(_args(config, max_steps, every, killed, *extra, "--ckpt_path", "last"))
    (straight,) = (tmp_path / "straight").glob("*/version_0/checkpoints/last.ckpt")
    (resumed,) = killed.glob("*/version_1/checkpoints/last.ckpt")
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    assert a["global_step"] == b["global_step"] == max_steps
    for key in ("state_dict", "ema_state_dict", "optimizer_states"):
        _assert_close(a[key], b[key], key)
    ema = next(k for k in a["callbacks"] if k.startswith("EMACallback"))
    _assert_close(a["callbacks"][ema], b["callbacks"][ema], "EMA callback state")
    assert a["loops"]["fit_loop"]["state_dict"] == b["loops"]["fit_loop"]["state_dict"]  # data position


@pytest.mark.parametrize("stop_after", [3, 22])  # mid-epoch, and at the very end of an epoch
def test_train_batches_resume_with_the_same_order_and_dequantisation_noise(stop_after):
    dm = GenerativeDataModule("digits", batch_size=64)
    loader = dm.train_dataloader()
    straight = [b for _ in range(2) for b in loader]  # two epochs, uninterrupted

    interrupted = dm.train_dataloader()
    iterator = iter(interrupted)
    before = [next(iterator) for _ in range(stop_after)]
    state = interrupted.state_dict()
    resumed = GenerativeDataModule("digits", batch_size=64).train_dataloader()
    resumed.load_state_dict(state)
    # The rest of this epoch (none when it stopped at its end), then the next epoch.
    after = list(resumed) + (list(resumed) if stop_after < len(loader) else [])
    assert len(before) + len(after) == len(straight)
    for got, want in zip(before + after, straight):
        assert torch.equal(got, want)
    # Dequantisation noise really is fresh per batch and per epoch (so the test above could fail).
    assert not torch.equal(straight[0], straight[len(loader)])
