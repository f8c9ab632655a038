"""Precision/recall and mode coverage: their defining properties on sets where the answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flows.data.toy2d import TOY_MODES, sample_8gaussians
from lightning_flows.metrics import mode_coverage, precision_recall
from lightning_flows.metrics.precision_recall import knn_radii


def test_knn_radius_is_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert torch.equal(knn_radii(points, 1), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    assert torch.equal(knn_radii(points, 2), torch.tensor([3.0, 2.0, 3.0, 6.0]))
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(points, 4)


def test_precision_and_recall_separate_realism_from_coverage():
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 2, generator=gen)
    same = torch.randn(1000, 2, generator=gen)
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9  # one distribution: both high
    collapsed = 0.05 * torch.randn(1000, 2, generator=gen)  # realistic points, one spot of the data
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.3
    far = torch.randn(1000, 2, generator=gen) + 20.0  # nothing realistic, nothing covered
    assert precision_recall(real, far) == (0.0, 0.0)


def test_mode_coverage_of_the_data_itself_and_of_a_collapsed_model():
    centres, std = TOY_MODES["8gaussians"]
    data = sample_8gaussians(4000, torch.Generator().manual_seed(0))
    full = mode_coverage(data, centres, std)
    assert full.modes_hit == 8 and full.num_modes == 8
    assert full.kl_to_uniform < 0.01 and full.good_fraction > 0.99  # 3 std holds 98.9% of a 2D Gaussian
    one_mode = centres[3] + 0.3 * std * torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    collapsed = mode_coverage(one_mode, centres, std)
    assert collapsed.modes_hit == 1
    assert collapsed.kl_to_uniform == pytest.approx(math.log(8), abs=1e-9)
    nowhere = mode_coverage(torch.zeros(100, 2), centres, std)  # the origin is far from every mode
    assert nowhere.modes_hit == 0 and nowhere.good_fraction == 0.0
