"""Shared pieces of the evaluation tests (no tests here): a model of known density, and a random
classifier file so FID tests need neither training nor downloads."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_flows.metrics.classifier import FeatureClassifier, save_classifier
from lightning_flows.models.base import GenerativeModel


class DiagonalGaussian(GenerativeModel):
    """``N(mean, diag(exp(log_std))^2)`` in model space: closed-form ``log_prob`` and exact sampling."""

    likelihood = "exact"

    def __init__(self, data_shape=(1, 8, 8), lr: float = 1e-2, likelihood: str = "exact"):
        super().__init__(data_shape, lr)
        self.likelihood = likelihood
        self.mean = nn.Parameter(torch.zeros(self.data_shape))
        self.log_std = nn.Parameter(torch.zeros(self.data_shape))

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.log_std.exp()
        per_dim = -0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(1).sum(1)

    def training_loss(self, x: Tensor) -> Tensor:
        return -self.log_prob(x).mean()

    def sample(self, n: int) -> Tensor:
        eps = torch.randn(n, *self.data_shape, device=self.device)
        self.last_sample_nfe = 1
        return self.mean + self.log_std.exp() * eps


def fitted_gaussian(data: Tensor, **kwargs) -> DiagonalGaussian:
    """A Gaussian with the per-pixel mean and std of ``data: (N, C, H, W)`` (a plausible 'model')."""
    model = DiagonalGaussian(data_shape=tuple(data.shape[1:]), **kwargs)
    with torch.no_grad():
        model.mean.copy_(data.mean(0))
        model.log_std.copy_(data.std(0).clamp_min(1e-2).log())
    return model


def random_classifier_file(path: Path, seed: int = 0) -> Path:
    """An untrained classifier saved in the cache format: random features, instant to make."""
    torch.manual_seed(seed)
    return save_classifier(FeatureClassifier(in_channels=1, num_classes=10), Path(path), "digits", accuracy=0.0)
