"""2D sample quality that sees what the scatter plots show (issue 20, items 3 and 8): a ring of the right radius
scores clearly worse than samples of the true 8-Gaussian mixture on the kernel MMD and the cross-entropy gap, each
number beside its real-vs-real null; and the sampling noise of one model is reported apart from the seeds'."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.toy2d import TOY_MODES, sample_8gaussians
from lightning_flows.evaluation import EvaluationSpec, Evaluator
from lightning_flows.metrics.cross_entropy_gap import cross_entropy_gap
from lightning_flows.metrics.kernel_mmd import gaussian_mmd2, median_bandwidth
from lightning_flows.models.base import GenerativeModel

RADIUS = 4.0 / math.sqrt(2.0)  # the 8 Gaussians' centres lie on this circle


class Sampler(GenerativeModel):
    """A 'model' that samples a given function of the global generator (no likelihood)."""

    def __init__(self, draw):
        super().__init__((2,))
        self.draw = draw
        self.anchor = nn.Parameter(torch.zeros(()))

    def sample(self, n: int) -> Tensor:
        self.last_sample_nfe = 1
        return self.draw(n)


def true_mixture(n: int) -> Tensor:
    return sample_8gaussians(n, torch.default_generator)


def ring(n: int) -> Tensor:
    """Mass spread evenly around the circle of the modes, as wide as one mode: flow matching's and diffusion's
    8-Gaussian samples in the quick montage."""
    angle = torch.rand(n) * 2 * math.pi
    radius = RADIUS + TOY_MODES["8gaussians"][1] * torch.randn(n)
    return torch.stack([angle.cos(), angle.sin()], 1) * radius[:, None]


@pytest.fixture(scope="module")
def gaussians():
    dm = GenerativeDataModule("8gaussians")
    dm.setup()
    return dm


def quality_spec(tmp_path, **kwargs) -> EvaluationSpec:
    return EvaluationSpec(**{"n_samples": 1000, "sample_batch_size": 500, "likelihood": False, "timing": False,
                             "progress": False, "null_draws": 10, "cache_dir": str(tmp_path), **kwargs})


def test_a_ring_scores_clearly_worse_than_the_true_mixture_beside_the_real_vs_real_null(gaussians, tmp_path):
    truth = Evaluator(quality_spec(tmp_path)).evaluate(Sampler(true_mixture), gaussians)
    smeared = Evaluator(quality_spec(tmp_path)).evaluate(Sampler(ring), gaussians)
    for key in ("mmd", "ce_gap_nats"):
        mean, std = truth[f"{key}_null_mean"], truth[f"{key}_null_std"]
        assert truth[f"{key}_within_noise"], (key, truth[key], mean, std)  # real-like samples: within noise
        assert not smeared[f"{key}_within_noise"]
        assert smeared[key] - mean > 10 * std and smeared[key] > 5 * abs(truth[key] - mean) + 10 * std, key
    assert smeared["ce_gap_nats"] > 0.5  # nats: the ring puts mass where the mixture has next to none
    assert truth["mmd_bandwidth"] == TOY_MODES["8gaussians"][1] and truth["mmd_bandwidth_source"] == "component std"
    assert truth["null_draws"] == 10 and truth["null_source"] == "fresh draws of the true sampler"
    # the data-only null is the same for every model
    assert smeared["mmd_null_std"] == truth["mmd_null_std"] and smeared["energy_distance_null_std"] > 0


def test_sampling_noise_is_reported_apart_and_each_run_seed_draws_its_own_samples(gaussians, tmp_path, monkeypatch):
    spec = quality_spec(tmp_path, sampling_std_draws=2)
    model = Sampler(true_mixture)
    first = Evaluator(spec).evaluate(model, gaussians, run_seed=0)
    again = Evaluator(spec).evaluate(model, gaussians, run_seed=0)
    other = Evaluator(spec).evaluate(model, gaussians, run_seed=1)
    assert first["sampling_seed"] == 0 and other["sampling_seed"] == 1000 and first["sampling_std_sets"] == 3
    assert first["mmd"] == again["mmd"] and first["mmd"] != other["mmd"]
    for key in ("energy_distance", "mmd", "ce_gap_nats", "precision", "recall"):
        assert first[f"{key}_sampling_std"] > 0, key
    fixed = EvaluationSpec(**{**spec.to_dict(), "seed_samples_per_run": False})
    assert Evaluator(fixed).evaluate(model, gaussians, run_seed=1)["mmd"] == first["mmd"]
    # By default the run's seed is the one seed_everything recorded (the CLI's and the benchmark's runs).
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    assert Evaluator(spec).evaluate(model, gaussians)["mmd"] == other["mmd"]


def test_kernel_mmd_and_cross_entropy_gap_basics(gaussians):
    g = torch.Generator().manual_seed(0)
    a, b = sample_8gaussians(800, g), sample_8gaussians(800, g)
    h = TOY_MODES["8gaussians"][1]
    assert gaussian_mmd2(a, b, h) == pytest.approx(gaussian_mmd2(b, a, h), rel=1e-9)
    assert abs(gaussian_mmd2(a, b, h)) < 0.2 * gaussian_mmd2(a, b + 0.5, h)
    assert median_bandwidth(a) > 5 * h  # the median heuristic on a multimodal density is the scale of the whole
    log_p = gaussians.splits.log_density
    entropy = float(-log_p(sample_8gaussians(200_000, g)).double().mean())
    assert abs(cross_entropy_gap(a, log_p, entropy)) < 0.1
    assert cross_entropy_gap(a * 0.0, log_p, entropy) > 5  # every sample at the origin, between the modes


def test_a_density_with_bounded_support_reports_the_fraction_off_it(tmp_path):
    board = GenerativeDataModule("checkerboard")
    result = Evaluator(quality_spec(tmp_path)).evaluate(Sampler(lambda n: torch.randn(n, 2) * 2), board)
    assert "ce_gap_nats" not in result and 0.3 < result["off_support_fraction"] < 0.8
    assert result["mmd_bandwidth_source"] == "median heuristic"


def test_a_stored_result_takes_the_current_null_and_keeps_its_own_numbers(gaussians, tmp_path):
    """The null is data only: a report recomputes it for a finished run (e.g. adopted from a snapshot evaluated with
    fewer null draws) without touching the run's metrics, and refuses a reference the run was not scored against."""
    result = Evaluator(quality_spec(tmp_path)).evaluate(Sampler(true_mixture), gaussians)
    result["curve"] = [{key: value for key, value in result.items() if isinstance(value, (int, float))
                        and not isinstance(value, bool)}]
    fresh = Evaluator(quality_spec(tmp_path, null_draws=30))
    refreshed = fresh.refresh_nulls(result, gaussians)
    direct = fresh.evaluate(Sampler(true_mixture), gaussians)  # same run seed: the same samples
    assert refreshed["null_draws"] == 30 and result["null_draws"] == 10
    for key in ("energy_distance", "mmd", "ce_gap_nats"):
        assert refreshed[key] == result[key] == direct[key]  # the run's own numbers stay
        for suffix in ("_null_mean", "_null_std", "_within_noise"):
            assert refreshed[key + suffix] == direct[key + suffix], key + suffix
        assert refreshed[key + "_null_std"] != result[key + "_null_std"]
        assert refreshed["curve"][0][key + "_null_std"] == direct[key + "_null_std"]
    assert "energy_distance_within_noise" not in refreshed["curve"][0]  # a curve point keeps its own keys
    images = {"fid": 30.0, "n_quality": 500}
    assert fresh.refresh_nulls(images, gaussians) == images  # no null: unchanged
    other = GenerativeDataModule("8gaussians", seed=1)
    with pytest.raises(ValueError, match="not the points it was scored against"):
        fresh.refresh_nulls(result, other)
