"""BitsPerDimCallback: closed form on a model of known density, exact/bound labels, absent for none."""

from __future__ import annotations

import math

import lightning as L
import pytest

from lightning_flows.callbacks import BitsPerDimCallback
from lightning_flows.data import GenerativeDataModule
from test_eval_helpers import DiagonalGaussian, fitted_gaussian


@pytest.fixture(scope="module")
def digits():
    dm = GenerativeDataModule("digits", batch_size=64, eval_batch_size=50)
    dm.setup()
    return dm


def run_test(model, datamodule, callback):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
    trainer.test(model, datamodule=datamodule, verbose=False)
    return dict(trainer.callback_metrics)


def test_bpd_of_a_gaussian_matches_the_closed_form(digits):
    model = fitted_gaussian(digits.split("train"))
    callback = BitsPerDimCallback()
    metrics = run_test(model, digits, callback)

    # Closed form, written out independently of the library: Gaussian NLL of the test split in
    # model space [-1, 1), minus log|det| of y -> 2y - 1 (D log 2), plus D log L for the 17 levels.
    x = digits.split("test").double()
    mean, std = model.mean.detach().double(), model.log_std.detach().double().exp()
    nll = (0.5 * ((x - mean) / std) ** 2 + std.log() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    D, L_levels = 64, 17
    expected = ((nll.mean() - D * math.log(2) + D * math.log(L_levels)) / (D * math.log(2))).item()

    assert callback.last_logged["test/bpd_exact"] == pytest.approx(expected, rel=1e-6)  # float32 model
    assert callback.last_logged["test/likelihood_examples"] == 180  # every test example exactly once
    assert metrics["test/bpd_exact"].item() == pytest.approx(expected, rel=1e-6)
    # a standard normal is a worse density for digits than the fitted one
    worse = run_test(DiagonalGaussian(), digits, BitsPerDimCallback())["test/bpd_exact"].item()
    assert worse > expected


def test_bound_models_are_labelled_bound_and_none_models_log_nothing(digits):
    bound = run_test(fitted_gaussian(digits.split("train"), likelihood="bound"), digits, BitsPerDimCallback())
    assert "test/bpd_bound" in bound and "test/bpd_exact" not in bound
    none = run_test(fitted_gaussian(digits.split("train"), likelihood="none"), digits, BitsPerDimCallback())
    assert not any(name.startswith("test/bpd") for name in none), none  # absent, not zero


def test_validation_bpd_follows_every_n_epochs_and_skips_the_sanity_check(digits):
    model = fitted_gaussian(digits.split("train"))
    seen = []

    class Recorder(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append((trainer.sanity_checking, trainer.current_epoch, "val/bpd_exact" in trainer.callback_metrics))

    bpd = BitsPerDimCallback(every_n_epochs=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=2,
                        limit_train_batches=2, num_sanity_val_steps=1, callbacks=[bpd, Recorder()])
    trainer.fit(model, datamodule=digits)
    assert seen[0][0] and not seen[0][2]  # the sanity check logs no bpd
    assert [s[2] for s in seen[1:]] == [False, True]  # epoch 0 skipped, epoch 1 evaluated
    assert bpd.last_logged["val/likelihood_examples"] == 180
    assert math.isfinite(bpd.last_logged["val/bpd_exact"])


@pytest.mark.parametrize("limit, expected", [(2, 100), (0.5, 90)])
def test_validation_likelihood_honours_limit_val_batches(digits, limit, expected):
    model = fitted_gaussian(digits.split("train"))
    bpd = BitsPerDimCallback(every_n_epochs=1, batch_size=50)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, max_epochs=1,
                        limit_train_batches=1, limit_val_batches=limit, num_sanity_val_steps=0, callbacks=[bpd])
    trainer.fit(model, datamodule=digits)
    assert bpd.last_logged["val/likelihood_examples"] == expected  # 2 batches of 50, or half of 180
