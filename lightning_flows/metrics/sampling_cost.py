"""Sampling cost: network evaluations (NFE) and wall-clock seconds per generated sample.

NFE comes from the family itself: ``sample`` sets ``model.last_sample_nfe``, the evaluations one
batch needed (every sample of a batch goes through each evaluation, so it is also NFE per sample).
Seconds are wall-clock on the sampling device; on a GPU the clock is read only after
``torch.cuda.synchronize``, since kernels run asynchronously and an unsynchronised timer measures
only the launch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lightning_flows.metrics.distributed import sum_across_ranks


def synchronize(device: torch.device | str) -> None:
    """Block until queued work on ``device`` is done (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SamplingCost:
    """Accumulated cost of drawing ``samples`` samples.

    ``nfe_samples`` is the sum over batches of ``NFE x batch size``; ``samples_with_nfe`` counts the
    samples whose family reported an NFE, so a family that reports none yields ``None``, not 0.
    """

    samples: int = 0
    seconds: float = 0.0
    nfe_samples: float = 0.0
    samples_with_nfe: int = 0

    def add(self, batch_size: int, seconds: float, nfe: int | None) -> None:
        self.samples += batch_size
        self.seconds += seconds
        if nfe is not None:
            self.nfe_samples += float(nfe) * batch_size
            self.samples_with_nfe += batch_size

    @property
    def sec_per_sample(self) -> float | None:
        return self.seconds / self.samples if self.samples else None

    @property
    def nfe_per_sample(self) -> float | None:
        return self.nfe_samples / self.samples_with_nfe if self.samples_with_nfe else None

    def reduced(self, device: torch.device | str = "cpu") -> "SamplingCost":
        """Sum over DDP ranks (a collective: every rank must call it).

        Seconds are summed too, so ``sec_per_sample`` is device-seconds per sample: the same number
        whether the samples were drawn on one device or split over eight.
        """
        totals = torch.tensor([self.samples, self.seconds, self.nfe_samples, self.samples_with_nfe],
                              dtype=torch.float64)
        samples, seconds, nfe_samples, with_nfe = sum_across_ranks(totals, device).tolist()
        return SamplingCost(int(round(samples)), seconds, nfe_samples, int(round(with_nfe)))


def timed_sample(model, n: int, cost: SamplingCost, device: torch.device | str, **sample_kwargs) -> torch.Tensor:
    """``model.sample(n, **sample_kwargs)`` (e.g. a conditional model's ``y`` and ``guidance``), with its wall
    time and NFE added to ``cost``. Returns ``(n, *shape)``."""
    model.last_sample_nfe = None  # a family that does not report NFE must not inherit a stale value
    synchronize(device)
    start = time.perf_counter()
    samples = model.sample(n, **sample_kwargs)
    synchronize(device)
    cost.add(n, time.perf_counter() - start, model.last_sample_nfe)
    return samples
