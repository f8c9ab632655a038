"""The importance-weighted discrete likelihood (issue 20, item 1) and the labels of every likelihood: a uniform
density and a density that is piecewise constant on the level cells give their exact discrete likelihood for any
K; on a smooth density the IW-K NLL lies between the one-draw dequantised bound and the exact discrete NLL
(computed in closed form), and tightens with K; each number says what it is."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.quantisation import bin_edges, bin_index, piecewise_constant_log_density
from lightning_flows.evaluation import EvaluationSpec, Evaluator
from lightning_flows.evaluation.likelihood_labels import likelihood_traits
from lightning_flows.metrics.baselines import independent_pixel_bits_per_dim, independent_pixel_log_prob
from lightning_flows.models import VAE
from lightning_flows.models.base import GenerativeModel
from test_eval_helpers import fitted_gaussian

LEVELS, DIM = 17, 64


@pytest.fixture(scope="module")
def digits():
    dm = GenerativeDataModule("digits", batch_size=64)
    dm.setup()
    return dm


def likelihood_only(**kwargs) -> EvaluationSpec:
    return EvaluationSpec(quality=False, timing=False, progress=False, likelihood_batch_size=64, **kwargs)


class UniformOnTheCube(GenerativeModel):
    """The uniform density on model space [-1, 1]^D: ``log p = -D log 2``, so ``P(k) = L^-D`` for every k."""

    likelihood = "exact"

    def __init__(self):
        super().__init__((1, 8, 8))
        self.anchor = nn.Parameter(torch.zeros(()))

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), -DIM * math.log(2.0)) + 0 * self.anchor


class IndependentPixels(GenerativeModel):
    """Per-pixel categoricals fitted on the training levels, spread uniformly over each level cell: a density
    that is piecewise constant on the cells, whose discrete likelihood is known exactly."""

    likelihood = "exact"

    def __init__(self, train_levels: Tensor):
        super().__init__((1, 8, 8))
        self.train_levels = train_levels
        self.anchor = nn.Parameter(torch.zeros(()))

    def log_prob(self, x: Tensor) -> Tensor:
        k = bin_index(x, LEVELS).to(torch.uint8)
        log_p = independent_pixel_log_prob(self.train_levels, k, LEVELS)
        return piecewise_constant_log_density(log_p, DIM, LEVELS).float() + 0 * self.anchor


@pytest.mark.parametrize("k", [1, 2, 8])
def test_uniform_density_gives_exactly_log2_levels_bits_per_dim_for_any_k(digits, k):
    result = Evaluator(likelihood_only(iw_samples=k)).evaluate(UniformOnTheCube(), digits)
    assert result["bpd_exact"] == pytest.approx(math.log2(LEVELS), abs=1e-7)  # float32 log p
    if k == 1:
        assert "bpd_iw_exact" not in result and result["likelihood_source_discrete"] == "bpd_exact"
    else:
        assert result["bpd_iw_exact"] == pytest.approx(math.log2(LEVELS), abs=1e-7)
        assert result["iw_samples"] == k and result["likelihood_label_iw_exact"] == f"discrete, IW-{k} bound"
    assert result["bpd_discrete"] == pytest.approx(math.log2(LEVELS), abs=1e-7)


def test_piecewise_constant_density_gives_its_exact_discrete_likelihood(digits):
    model = IndependentPixels(digits.splits.train)
    exact = independent_pixel_bits_per_dim(digits.splits.train, digits.splits.test, LEVELS)
    result = Evaluator(likelihood_only(iw_samples=5)).evaluate(model, digits)
    assert result["bpd_exact"] == pytest.approx(exact, abs=1e-6)
    # Every draw of a cell scores the same. (Not to 1e-6: a draw u within float32 rounding of 1 lands, in model
    # space, on the next cell's edge, where this test model reads the next level: one of these 46,080 draws.)
    assert result["bpd_iw_exact"] == pytest.approx(exact, abs=1e-4)
    assert result["bpd_iw_gain_exact"] == pytest.approx(0.0, abs=1e-4)


def exact_discrete_nll(model, levels: Tensor) -> float:
    """``-mean log P(k)`` of a diagonal Gaussian in model space: the product of its per-dimension masses on the
    level cells (normal CDF differences), in nats."""
    lower, upper = bin_edges(levels.long(), LEVELS, torch.float64)
    mean, std = model.mean.detach().double(), model.log_std.detach().double().exp()
    a, b = (lower - mean) / std, (upper - mean) / std
    # Cells above the mean through the upper tail, so that far cells keep their tiny mass (no 1 - 1 = 0).
    ndtr = torch.special.ndtr
    mass = torch.where(a > 0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))
    return float(-mass.log().flatten(1).sum(1).mean())


def test_iw_bound_tightens_with_k_towards_the_exact_discrete_nll_of_a_smooth_density(digits):
    model = fitted_gaussian(digits.split("train"))
    with torch.no_grad():  # no pixel much sharper than a level cell (else IW-64 is far from converged)
        model.log_std.clamp_min_(math.log(0.1))
    exact = exact_discrete_nll(model, digits.splits.test)  # -log P(k), nats
    results = {k: Evaluator(likelihood_only(iw_samples=k)).evaluate(model, digits) for k in (2, 8, 64)}
    one_draw = results[2]["bpd_exact"]
    iw = [results[k]["bpd_iw_exact"] for k in (2, 8, 64)]
    exact_bpd = exact / (DIM * math.log(2))
    # The dequantised bound >= IW-2 >= IW-8 >= the exact discrete NLL, and IW-64 recovers nearly all the gap (it is
    # a bound in expectation: this realisation lands 2% of the gap below the exact value, within its noise).
    gap = one_draw - exact_bpd
    assert one_draw > iw[0] > iw[1] > iw[2] and iw[1] > exact_bpd + 0.1 * gap, (one_draw, iw, exact_bpd)
    assert abs(iw[2] - exact_bpd) < 0.05 * gap
    assert results[8]["bpd_iw_gain_exact"] == pytest.approx(one_draw - iw[1])
    assert results[8]["likelihood_label_exact"] == "dequantised bound" and results[8]["nll_upper_bound_iw_exact"]
    assert results[8]["bpd_discrete"] == iw[1] and results[8]["likelihood_source_discrete"] == "bpd_iw_exact"


def test_vae_labels_depend_on_its_decoder_and_a_discrete_decoder_is_not_reweighted(digits):
    torch.manual_seed(0)
    kwargs = dict(data_shape=(1, 8, 8), data_levels=LEVELS, latent_dim=4, network="mlp", hidden=32, depth=1,
                  iwae_k=4)
    discrete = Evaluator(likelihood_only(iw_samples=3)).evaluate(VAE(decoder="discretized_logistic", **kwargs), digits)
    assert discrete["likelihood_label_bound"] == "ELBO / IWAE-4 bound" and discrete["nll_upper_bound_bound"]
    assert "bpd_iw_bound" not in discrete and discrete["likelihood_source_discrete"] == "bpd_bound"
    gaussian = Evaluator(likelihood_only(iw_samples=3)).evaluate(VAE(decoder="gaussian", **kwargs), digits)
    assert gaussian["likelihood_label_bound"] == "dequantised ELBO / IWAE-4 bound"
    # exp(IWAE) is an unbiased density estimate: its IW average over dequantisation draws is still a bound.
    assert gaussian["likelihood_label_iw_bound"] == "discrete, IW-3 bound (ELBO / IWAE-4 bound inside)"
    assert gaussian["nll_upper_bound_iw_bound"] is True


def test_hutchinson_iw_is_labelled_an_estimate_and_never_the_headline(digits):
    from lightning_flows.models import Diffusion

    torch.manual_seed(0)
    model = Diffusion(data_shape=(1, 8, 8), data_levels=LEVELS, num_steps=20, base_channels=8, channel_mults=(1, 2),
                      bound_timesteps=4, likelihood_divergence="hutchinson",
                      likelihood_solver={"method": "rk4", "steps": 2})
    assert "bpd_iw_estimate" not in Evaluator(likelihood_only(iw_samples=3, max_likelihood_examples=16)).evaluate(
        model, digits)  # Hutchinson's IW only on request (iw_estimates)
    result = Evaluator(likelihood_only(iw_samples=3, iw_estimates=True, max_likelihood_examples=16)).evaluate(
        model, digits)
    assert result["likelihood_label_bound"] == "dequantised DDPM bound" and "bpd_iw_bound" not in result
    assert result["likelihood_label_estimate"] == "dequantised bound, unbiased estimate (Hutchinson)"
    assert result["nll_upper_bound_estimate"] is True  # in expectation: an unbiased estimate of a bound
    assert result["likelihood_label_iw_estimate"].startswith("discrete, IW-3 estimate (Hutchinson")
    assert result["nll_upper_bound_iw_estimate"] is False
    assert result["likelihood_source_discrete"] in ("bpd_bound", "bpd_estimate")
    assert result["bpd_discrete"] == min(result["bpd_bound"], result["bpd_estimate"])
    assert likelihood_traits(model, "bound").on_levels is False


def test_iw_likelihood_is_reproducible_and_continuous_data_gets_no_iw():
    dm = GenerativeDataModule("8gaussians")
    model = fitted_gaussian(dm.split("train"))
    result = Evaluator(likelihood_only(max_likelihood_examples=500)).evaluate(model, dm)
    assert result["likelihood_label_exact"] == "exact" and not any("iw" in key for key in result)
    assert "bpd_discrete" not in result


def test_a_family_named_likelihood_reads_as_one_label_without_nested_parentheses():
    """MeanFlow names its likelihood "estimate, ODE of u(z, t, t)": on digits the label says what the value is once
    and where it comes from once."""
    from lightning_flows.evaluation.likelihood_labels import LikelihoodTraits, label

    estimate = LikelihoodTraits(name="estimate, ODE of u(z, t, t)", value="estimate")
    exact = LikelihoodTraits(name="exact, ODE of u(z, t, t)", value="exact", unbiased_density=True)
    assert label(estimate, discrete=True) == "dequantised bound, unbiased estimate (Hutchinson), ODE of u(z, t, t)"
    assert label(exact, discrete=True) == "dequantised bound, ODE of u(z, t, t)"
    assert label(LikelihoodTraits(name="exact", value="exact"), discrete=True) == "dequantised bound"
