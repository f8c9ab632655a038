"""Sampling cost: NFE per sample as the family reports it, seconds per sample, absent NFE stays absent."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_flows.callbacks import SamplingCostCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.metrics.sampling_cost import SamplingCost, timed_sample
from lightning_flows.models import FlowMatching
from test_eval_helpers import DiagonalGaussian


def run_test(model, callback):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_test_batches=1,
                        callbacks=[callback])
    trainer.test(model, datamodule=GenerativeDataModule("moons", batch_size=64), verbose=False)
    return dict(trainer.callback_metrics)


def test_flow_matching_nfe_per_sample_is_the_solver_count():
    model = FlowMatching(data_shape=(2,), hidden=16, depth=1, sampler={"method": "midpoint", "steps": 3})
    callback = SamplingCostCallback(n=50, chunk_size=20)
    metrics = run_test(model, callback)
    assert callback.last_logged["test/nfe_per_sample"] == 6.0  # midpoint: 2 evaluations per step
    assert callback.last_logged["test/ms_per_sample"] > 0
    assert metrics["test/nfe_per_sample"].item() == 6.0


def test_a_family_that_reports_no_nfe_logs_seconds_only():
    class Silent(DiagonalGaussian):
        def sample(self, n):
            return torch.zeros(n, *self.data_shape)

    callback = SamplingCostCallback(n=10, chunk_size=10)
    metrics = run_test(Silent(data_shape=(2,)), callback)
    assert "test/nfe_per_sample" not in metrics and "test/ms_per_sample" in metrics


def test_cost_is_weighted_by_samples_and_stale_nfe_is_not_reused():
    model = DiagonalGaussian(data_shape=(2,))
    cost = SamplingCost()
    timed_sample(model, 30, cost, "cpu")
    model.sample = lambda n: torch.zeros(n, 2)  # reports nothing: its samples carry no NFE
    timed_sample(model, 10, cost, "cpu")
    assert cost.samples == 40 and cost.samples_with_nfe == 30 and cost.nfe_per_sample == 1.0
    assert cost.sec_per_sample == pytest.approx(cost.seconds / 40)
