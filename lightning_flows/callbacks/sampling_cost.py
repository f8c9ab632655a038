"""Log the cost of sampling: NFE per sample and seconds per sample, for any family.

:class:`FIDCallback` already logs these for the samples it draws; use this callback where there is
no FID (2D data) or to time sampling on its own schedule.
"""

from __future__ import annotations

import lightning as L

from lightning_flows.metrics.distributed import rank_and_world
from lightning_flows.metrics.generation import generate_rank_share
from lightning_flows.metrics.sampling_cost import SamplingCost


def log_sampling_cost(pl_module: L.LightningModule, stage: str, cost: SamplingCost) -> dict[str, float]:
    """Log an already rank-reduced ``cost`` as ``<stage>/nfe_per_sample`` (absent when the family
    reports no NFE) and ``<stage>/sec_per_sample``; returns what was logged."""
    values = {f"{stage}/sec_per_sample": cost.sec_per_sample}
    if cost.nfe_per_sample is not None:
        values[f"{stage}/nfe_per_sample"] = cost.nfe_per_sample
    for name, value in values.items():
        # Already identical on every rank (reduced), so no further sync.
        pl_module.log(name, value, sync_dist=False)
    return values


def should_evaluate(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Validation epochs to evaluate on: not the sanity check, every ``every_n_epochs``-th (0 = never)."""
    if trainer.sanity_checking or every_n_epochs < 1:
        return False
    return (trainer.current_epoch + 1) % every_n_epochs == 0


class SamplingCostCallback(L.Callback):
    """Draw ``n`` samples (split over ranks, ``chunk_size`` per ``sample`` call) and log their cost.

    Runs at the end of every ``every_n_epochs``-th validation epoch and of testing, on *all* ranks.
    """

    def __init__(self, n: int = 256, chunk_size: int = 256, every_n_epochs: int = 1, seed: int = 0):
        super().__init__()
        self.n, self.chunk_size, self.every_n_epochs, self.seed = n, chunk_size, every_n_epochs, seed
        self.last_logged: dict[str, float] = {}

    def _measure(self, pl_module, stage: str) -> None:
        rank, world = rank_and_world()
        cost = SamplingCost()
        generate_rank_share(pl_module, self.n, self.chunk_size, self.seed, rank, world, cost)
        self.last_logged = log_sampling_cost(pl_module, stage, cost.reduced(pl_module.device))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self._measure(pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._measure(pl_module, "test")
