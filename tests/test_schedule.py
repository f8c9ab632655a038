"""The shared optimisation recipe: warm-up + cosine stepped per optimizer step over the run's budget
(steps, epochs or time), the same arguments in every family, and the GAN's two optimizers."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

import lightning_flows.models as models
from subprocess_runs import run as run_process
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GAN, GenerativeModel
from lightning_flows.models.schedule import budget_progress, lr_factor


class TinyModel(GenerativeModel):
    def __init__(self, **recipe):
        super().__init__((2,), lr=0.1, **recipe)
        self.linear = nn.Linear(2, 2)

    def training_loss(self, x):
        return (self.linear(x) - 0.5 * x).pow(2).mean()


class LRRecorder(L.Callback):
    """The learning rate of every optimizer at every optimizer step (read just before it steps)."""

    def __init__(self):
        self.rates: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append([group["lr"] for group in optimizer.param_groups])


def fit(model, recorder, **trainer_kwargs):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[recorder], **trainer_kwargs)
    trainer.fit(model, GenerativeDataModule("8gaussians", batch_size=64))
    return trainer


def expected_rate(base, step, warmup, horizon):
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / horizon))


def test_factor_closed_form():
    assert lr_factor("constant", 0, 7, 0.9) == 1.0
    assert lr_factor("constant", 4, 1, 0.0) == pytest.approx(0.5)
    assert lr_factor("cosine", 0, 0, 0.0) == 1.0
    assert lr_factor("cosine", 0, 0, 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 0, 0, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 10, 4, 1.5) == pytest.approx(0.0, abs=1e-12)  # clamped past the budget


def test_warmup_and_cosine_follow_max_steps_per_optimizer_step():
    recorder = LRRecorder()
    fit(TinyModel(lr_schedule="cosine", warmup_steps=4), recorder, max_steps=20)
    rates = [r[0] for r in recorder.rates]
    assert len(rates) == 20
    for step, rate in enumerate(rates):
        assert rate == pytest.approx(expected_rate(0.1, step, 4, 20))


def test_cosine_follows_max_epochs_when_it_binds():
    recorder = LRRecorder()
    trainer = fit(TinyModel(lr_schedule="cosine"), recorder, max_epochs=2, limit_train_batches=5)
    assert trainer.global_step == 10
    for step, (rate,) in enumerate(recorder.rates):
        assert rate == pytest.approx(expected_rate(0.1, step, 1, 10))


def test_progress_follows_the_time_budget_and_a_run_without_budget_is_refused():
    from lightning.pytorch.callbacks import Timer

    timer = Timer(duration={"seconds": 90})
    timer.time_elapsed = lambda stage="train": 30.0
    timer.time_remaining = lambda stage="train": 60.0
    no_step_limit = SimpleNamespace(estimated_stepping_batches=math.inf, max_steps=-1, callbacks=[timer], world_size=1)
    assert budget_progress(no_step_limit, step=5) == pytest.approx(1 / 3)
    # Whichever budget binds first sets the pace: 900 of 1000 steps beats a third of the time.
    step_limit = SimpleNamespace(estimated_stepping_batches=1000, max_steps=1000, callbacks=[timer], world_size=1)
    assert budget_progress(step_limit, step=900) == pytest.approx(0.9)
    unbounded = SimpleNamespace(estimated_stepping_batches=math.inf, max_steps=-1, callbacks=[], world_size=1)
    with pytest.raises(ValueError, match="max_time"):
        budget_progress(unbounded, step=0)


def test_gan_schedules_both_optimizers_over_batches():
    recorder = LRRecorder()
    torch.manual_seed(0)
    model = GAN(latent_dim=2, hidden=8, depth=1, lr_g=2e-3, lr_d=1e-3, lr_schedule="cosine", warmup_steps=2)
    # max_steps counts both optimizers' steps: 12 global steps = 6 batches = 6 steps of each optimizer.
    trainer = fit(model, recorder, max_steps=12)
    assert trainer.global_step == 12
    d_rates, g_rates = [r[0] for r in recorder.rates[0::2]], [r[0] for r in recorder.rates[1::2]]
    for step in range(6):
        assert d_rates[step] == pytest.approx(expected_rate(1e-3, step, 2, 6))
        assert g_rates[step] == pytest.approx(expected_rate(2e-3, step, 2, 6))


def test_every_family_takes_the_same_recipe_arguments():
    families = [getattr(models, name) for name in models.__all__]
    families = [cls for cls in families if inspect.isclass(cls) and issubclass(cls, GenerativeModel)
                and cls is not GenerativeModel]
    assert len(families) >= 8
    for cls in families:
        params = inspect.signature(cls.__init__).parameters
        for name in ("weight_decay", "lr_schedule", "warmup_steps"):
            assert name in params, f"{cls.__name__} lacks {name}"
        model = cls(lr_schedule="cosine", warmup_steps=3)
        assert (model.lr_schedule, model.warmup_steps) == ("cosine", 3)
        assert model.hparams["lr_schedule"] == "cosine"


def test_bad_recipe_names_the_choices():
    with pytest.raises(ValueError, match="constant, cosine"):
        TinyModel(lr_schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        TinyModel(warmup_steps=-1)


@pytest.mark.slow  # a feature under 2 DDP ranks, in `make test-slow` (keeps `make test` under 10 min)
@pytest.mark.timeout(300)
def test_time_budgeted_cosine_and_ema_agree_across_two_ddp_ranks(tmp_path):
    import os
    import sys
    from pathlib import Path

    probe = Path(__file__).with_name("ddp_schedule_probe.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, str(probe), str(tmp_path), "4"], timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["global_step"] == rank1["global_step"] > 5
    # The time fraction is rank 0's on both ranks, so the rates are bit-identical...
    assert rank0["rates"] == rank1["rates"]
    # ...they follow warm-up then a decay driven by time alone (no step or epoch limit was set)...
    rates = rank0["rates"]
    assert rates[0] == pytest.approx(0.5e-3) and max(rates) <= 1e-3
    assert rates[-1] < 0.5 * max(rates)
    # ...and the replicas (weights and their EMA) never drift apart.
    for name, weight in rank0["state_dict"].items():
        assert torch.equal(weight, rank1["state_dict"][name]), name
    for name, value in rank0["ema"].items():
        assert torch.equal(value, rank1["ema"][name]), name
