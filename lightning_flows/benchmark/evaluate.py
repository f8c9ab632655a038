"""Evaluate a trained model on the test split: loss, likelihood, sample quality and sampling cost.

One function for every family, so every number in the benchmark table comes from the same path.
"""

from __future__ import annotations

import time

import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.metrics import energy_distance
from lightning_flows.models import GenerativeModel


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _mean_test_loss(model: GenerativeModel, dm: GenerativeDataModule) -> float:
    total, count = 0.0, 0
    for batch in dm.test_dataloader():
        batch = batch.to(model.device)
        total += float(model.training_loss(batch)) * len(batch)
        count += len(batch)
    return total / count


@torch.no_grad()  # likelihood solves must not keep a graph of every solver step
def _mean_test_nll(model: GenerativeModel, dm: GenerativeDataModule, max_examples: int | None) -> float:
    total, count = 0.0, 0
    for batch in dm.test_dataloader():
        if max_examples is not None and count >= max_examples:
            break
        batch = batch.to(model.device)
        total += float(-model.log_prob(batch).double().sum())
        count += len(batch)
    return total / count


def evaluate(model: GenerativeModel, dm: GenerativeDataModule, n_samples: int = 1000, seed: int = 0,
             max_nll_examples: int | None = None) -> tuple[dict, torch.Tensor]:
    """Measure ``model`` on ``dm``'s test split; return ``(figures, samples)``.

    Absent keys mean "not applicable to this family" (no likelihood, no true density, not 2D).
    ``samples: (n_samples, *data_shape)`` in model space.
    """
    model.eval()
    dm.setup("test")
    torch.manual_seed(seed)
    likelihood = model.likelihood
    if getattr(model, "likelihood_divergence", "exact") == "hutchinson":
        likelihood += " (Hutchinson est.)"  # unbiased estimate of the exact value, not a bound
    row: dict = {"likelihood": likelihood, "test_loss": _mean_test_loss(model, dm)}

    _synchronise(model.device)
    start = time.perf_counter()
    samples = model.sample(n_samples)
    _synchronise(model.device)
    row["ms_per_sample"] = 1000 * (time.perf_counter() - start) / n_samples
    row["nfe_per_sample"] = model.last_sample_nfe

    if model.likelihood != "none":
        nll = _mean_test_nll(model, dm, max_nll_examples)
        row["test_nll_nats"] = nll
        if dm.is_discrete:
            row["test_bpd"] = float(dm.bits_per_dim(nll))
    test = dm.split("test")
    true_log_p = dm.true_log_density(test)
    if true_log_p is not None:
        row["true_entropy_nats"] = float(-true_log_p.double().mean())
        if "test_nll_nats" in row:
            row["nll_gap_nats"] = row["test_nll_nats"] - row["true_entropy_nats"]
    if len(dm.data_shape) == 1:
        reference = test[:n_samples]
        row["energy_distance"] = float(energy_distance(samples.cpu(), reference))
        # The floor: two disjoint real sets of the same size (validation vs test).
        row["energy_distance_floor"] = float(energy_distance(dm.split("val")[:n_samples], reference))
    return row, samples
