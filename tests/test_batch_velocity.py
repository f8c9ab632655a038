"""The batch estimate of the linear path's marginal velocity (MeanFlow's ``target_velocity: batch``) against the
closed form of a Gaussian mixture: far closer to E[x1 - x0 | z_t] than one pair's x1 - x0, and the class-restricted
estimate equals the class posterior's."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flows.data.toy2d import _eight_gaussian_centers, sample_8gaussians
from lightning_flows.flow_matching.batch_velocity import batch_marginal_velocity

SCALE = 1.0 / math.sqrt(2.0)
STD = 0.5 * SCALE  # each component's std (8 Gaussians in data units)


def exact_marginal_velocity(z: torch.Tensor, t: torch.Tensor, component: torch.Tensor | None = None) -> torch.Tensor:
    """E[x1 - x0 | z_t] under the 8-Gaussian mixture (or, with ``component``, given each row's component)."""
    z, t = z.double(), t.double()[:, None]
    centres = _eight_gaussian_centers() * SCALE  # (8, 2)
    var_z = t ** 2 * STD ** 2 + (1 - t) ** 2  # (B, 1): z | k ~ N(t mu_k, var_z I)
    mean_x1 = centres[None] + (t * STD ** 2 / var_z)[:, :, None] * (z[:, None, :] - t[:, :, None] * centres[None])
    if component is None:
        log_post = -((z[:, None, :] - t[:, :, None] * centres[None]) ** 2).sum(-1) / (2 * var_z)
        x1 = (torch.softmax(log_post, dim=1)[:, :, None] * mean_x1).sum(1)
    else:
        x1 = mean_x1[torch.arange(len(z)), component]
    return (x1 - z) / (1 - t)


@pytest.mark.parametrize("t_value, ratio, bound", [(0.0, 0.25, 0.12), (0.3, 0.25, 0.12), (0.7, 0.25, 0.12),
                                                   (0.95, 0.5, 0.6)])  # near t = 1 the pair's own x1 dominates
def test_the_batch_estimate_is_close_to_the_marginal_velocity_and_one_pair_is_not(t_value, ratio, bound):
    g = torch.Generator().manual_seed(0)
    x1 = sample_8gaussians(4000, g).double()
    x0 = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    t = torch.full((4000,), t_value, dtype=torch.float64)
    z = (1 - t[:, None]) * x0 + t[:, None] * x1
    exact = exact_marginal_velocity(z, t)
    estimate = batch_marginal_velocity(z, t, x1)
    rms = lambda v: float(((v - exact) ** 2).sum(1).mean().sqrt())  # noqa: E731
    assert rms(estimate) < ratio * rms(x1 - x0), (rms(estimate), rms(x1 - x0))
    assert rms(estimate) < bound  # data units: neighbouring modes' centres are 2.2 apart


def test_labels_restrict_the_posterior_to_the_class_and_the_null_label_to_none():
    g = torch.Generator().manual_seed(1)
    component = torch.randint(0, 8, (4000,), generator=g)
    centres = _eight_gaussian_centers() * SCALE
    x1 = centres[component] + STD * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    t = torch.rand(4000, generator=g, dtype=torch.float64) * 0.9
    z = (1 - t[:, None]) * x0 + t[:, None] * x1
    by_class = batch_marginal_velocity(z, t, x1, labels=component)
    assert float((by_class - exact_marginal_velocity(z, t, component)).norm(dim=1).mean()) < 0.08
    null = torch.full_like(component, 8)  # every label dropped: the unconditional estimate
    unconditional = batch_marginal_velocity(z, t, x1)
    assert torch.allclose(batch_marginal_velocity(z, t, x1, labels=null, null_label=8), unconditional)
