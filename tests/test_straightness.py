"""Path straightness (Liu et al.'s S): closed forms of the pure function, the evaluator's entry on an ODE with
a known solution, and the same number on two gloo DDP ranks as in one process."""

from __future__ import annotations

import math
import os

import pytest
import torch
from gloo_ranks import run_ranks

from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import EvaluationSpec, Evaluator
from lightning_flows.metrics import path_straightness
from lightning_flows.models import FlowMatching


def test_constant_velocity_paths_are_straight():
    times = torch.linspace(0, 1, 11)
    velocities = torch.randn(1, 5, 3).expand(11, 5, 3)
    result = path_straightness(velocities, times)
    assert torch.allclose(result.straightness, torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(result.kinetic_energy, velocities[0].double().pow(2).sum(-1))


def test_velocity_linear_in_time_matches_the_closed_form():
    # v(t) = c + b (2t - 1): displacement c, S = |b|^2 int (2t - 1)^2 dt = |b|^2 / 3, K = |c|^2 + |b|^2 / 3.
    c, b = torch.randn(4, 2).double(), torch.randn(4, 2).double()
    times = torch.linspace(0, 1, 2001, dtype=torch.float64)
    velocities = c + b * (2 * times - 1)[:, None, None]
    result = path_straightness(velocities, times)
    assert torch.allclose(result.straightness, b.pow(2).sum(-1) / 3, rtol=1e-5)
    assert torch.allclose(result.kinetic_energy, c.pow(2).sum(-1) + b.pow(2).sum(-1) / 3, rtol=1e-5)
    # S = K - |displacement|^2 holds exactly for the quadrature, on any grid (here a coarse, uneven one).
    uneven = torch.tensor([0.0, 0.1, 0.45, 0.5, 1.0], dtype=torch.float64)
    v = torch.randn(5, 3, 2, dtype=torch.float64)
    r = path_straightness(v, uneven)
    dt = uneven.diff()
    displacement = ((v[1:] + v[:-1]) / 2 * dt[:, None, None]).sum(0)
    assert torch.allclose(r.straightness, r.kinetic_energy - displacement.pow(2).sum(-1), atol=1e-12)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="T >= 2"):
        path_straightness(torch.randn(1, 3, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="monotone"):
        path_straightness(torch.randn(3, 3, 2), torch.tensor([0.0, 0.5, 0.5]))


class ExponentialFlow(FlowMatching):
    """dx/dt = x: paths x0 e^t, so S / K = 1 - 2 (e - 1) / (e + 1) = (3 - e) / (e + 1) for every path."""

    def sampling_ode(self):
        return (lambda x, t: x), 0.0, 1.0


def test_evaluator_reports_the_straightness_of_the_sampling_ode():
    dm = GenerativeDataModule("8gaussians")
    spec = EvaluationSpec(likelihood=False, quality=False, timing=False, progress=False, straightness_paths=300,
                          sample_batch_size=128, straightness_steps=50)
    result = Evaluator(spec).evaluate(ExponentialFlow(data_shape=(2,), hidden=8, depth=1), dm)
    assert result["straightness_rel"] == pytest.approx((3 - math.e) / (math.e + 1), rel=1e-3)
    assert result["straightness_paths"] == 300
    # Families without an ODE sampler report nothing.
    assert "straightness" not in Evaluator(EvaluationSpec(likelihood=False, quality=False, timing=False,
                                                          straightness_paths=4)).evaluate(_NoODE(), dm)


class _NoODE(FlowMatching):
    def sampling_ode(self):
        return None


def _straightness_worker(rank: int, world: int, out_dir: str) -> None:
    torch.save(_trained_like_straightness(), os.path.join(out_dir, f"rank{rank}.pt"))


def _trained_like_straightness() -> dict:
    torch.manual_seed(0)
    model = FlowMatching(data_shape=(2,), hidden=16, depth=1)
    spec = EvaluationSpec(likelihood=False, quality=False, timing=False, progress=False, straightness_paths=50,
                          sample_batch_size=16, straightness_steps=5)
    return Evaluator(spec).evaluate(model, GenerativeDataModule("8gaussians"))


@pytest.mark.slow  # a feature under 2 DDP ranks, in `make test-slow` (keeps `make test` under 10 min)
@pytest.mark.timeout(300)  # spawned ranks import torch afresh: tens of seconds on a busy machine
def test_straightness_on_two_ddp_ranks_equals_one_process(tmp_path):
    single = _trained_like_straightness()
    run_ranks(_straightness_worker, str(tmp_path), directory=tmp_path)
    for rank in (0, 1):
        ranked = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert ranked["straightness"] == pytest.approx(single["straightness"], rel=1e-6)
        assert ranked["straightness_rel"] == pytest.approx(single["straightness_rel"], rel=1e-6)
    assert single["straightness"] > 0
