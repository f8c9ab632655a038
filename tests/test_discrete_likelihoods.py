"""Discrete likelihoods on the data's levels: the cell geometry, the discretised laws, the independent-pixel
baseline and the data facts (levels) that reach a model from the DataModule, the CLI and checkpoints."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from subprocess_runs import run as run_process
from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.facts import accepted_data_facts, data_facts_for, fill_data_facts
from lightning_flows.data.quantisation import (
    bin_centre, bin_edges, bin_index, dequantise, piecewise_constant_log_density,
)
from lightning_flows.metrics.baselines import independent_pixel_bits_per_dim, independent_pixel_log_prob
from lightning_flows.models import VAE, Diffusion, FlowMatching, Glow
from lightning_flows.models.discretized import (
    categorical_log_prob, discretized_gaussian_log_prob, discretized_logistic_log_prob,
)

LAWS = {"logistic": discretized_logistic_log_prob, "gaussian": discretized_gaussian_log_prob}


# ---- cells ----
def test_cells_tile_model_space_and_dequantised_points_find_their_level():
    for levels in (17, 256):
        k = torch.arange(levels)
        lower, upper = bin_edges(k, levels)
        assert lower[0] == -1 and upper[-1] == pytest.approx(1.0)
        torch.testing.assert_close(upper[:-1], lower[1:])
        torch.testing.assert_close(bin_centre(k, levels), (lower + upper) / 2)
        # float32 dequantisation: both cell edges, and random noise, read back as the level.
        # Seeded: float32 noise within ~1e-6 of 1 can round onto the next cell's edge (left alone: ~1e-6 of the
        # pixels, one level up).
        seeded = torch.Generator().manual_seed(0)
        noise = torch.cat([torch.tensor([0.0, 0.5, 1 - 1e-4]), torch.rand(1000, generator=seeded)])
        x = dequantise(k[:, None].expand(levels, len(noise)), noise.expand(levels, len(noise)), levels)
        assert torch.equal(bin_index(x, levels), k[:, None].expand(levels, len(noise)))
        assert bin_index(torch.tensor([-3.0, 5.0]), levels).tolist() == [0, levels - 1]  # outside: edge levels


def test_piecewise_constant_density_integrates_to_one_and_gives_minus_log2_p_bits():
    dim, levels = 3, 5
    log_p = torch.log(torch.tensor(0.2))  # any P(k)
    density = piecewise_constant_log_density(log_p, dim, levels)
    assert float(density.exp()) * (2 / levels) ** dim == pytest.approx(0.2)  # density x cell volume = P
    dm = GenerativeDataModule("digits")
    log_p_digit = torch.tensor(-150.0)
    bpd = dm.bits_per_dim(-piecewise_constant_log_density(log_p_digit, dm.dim, dm.levels))
    assert float(bpd) == pytest.approx(150.0 / (dm.dim * math.log(2)))


# ---- discretised laws ----
@pytest.mark.parametrize("law", sorted(LAWS))
@pytest.mark.parametrize("levels", [2, 5, 17, 256])
def test_discretised_probabilities_over_all_levels_sum_to_one(law, levels):
    means = torch.tensor([0.0, 0.3, -0.97, 0.999, 4.0, -30.0, 0.01], dtype=torch.float64)
    log_scales = torch.tensor([0.0, -3.0, -7.0, -9.0, 1.0, -2.0, 5.0], dtype=torch.float64)
    k = torch.arange(levels)[:, None]
    probs = LAWS[law](k, means, log_scales, levels).exp()
    torch.testing.assert_close(probs.sum(0), torch.ones(len(means), dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("law", sorted(LAWS))
def test_discretised_cell_masses_match_the_cdf_and_stay_finite_in_the_tails(law):
    dist = {"logistic": lambda m, s: torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros(()), torch.ones(())),
        [torch.distributions.transforms.SigmoidTransform().inv,
         torch.distributions.transforms.AffineTransform(m, s)]),
        "gaussian": lambda m, s: torch.distributions.Normal(m, s)}[law]
    levels, mean, scale = 9, torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    k = torch.arange(levels)
    lower, upper = bin_edges(k, levels, torch.float64)
    cdf = {"logistic": lambda v: torch.sigmoid((v - mean) / scale),
           "gaussian": lambda v: dist(mean, scale).cdf(v)}[law]
    expected = cdf(upper) - cdf(lower)
    expected[0], expected[-1] = cdf(upper[0]), 1 - cdf(lower[-1])
    torch.testing.assert_close(LAWS[law](k, mean, scale.log(), levels).exp(), expected)
    # A cell a hundred scales into the tail: a finite log-probability and finite gradients.
    mean32 = torch.tensor([25.0], requires_grad=True)
    log_scale32 = torch.tensor([-2.0], requires_grad=True)
    log_p = LAWS[law](torch.tensor([3]), mean32, log_scale32, levels)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(mean32.grad).all() and torch.isfinite(log_scale32.grad).all()


def test_categorical_log_prob_is_the_log_softmax_entry():
    logits = torch.randn(4, 3, 7)
    k = torch.randint(0, 7, (4, 3))
    expected = torch.log_softmax(logits, -1)[torch.arange(4)[:, None], torch.arange(3), k]
    torch.testing.assert_close(categorical_log_prob(logits, k), expected)


# ---- the independent-pixel baseline ----
def test_independent_pixel_baseline_matches_a_hand_computation():
    # Two dimensions, three levels, three training examples.
    train = torch.tensor([[0, 2], [0, 1], [1, 2]])
    test = torch.tensor([[0, 2], [2, 0]])
    # add-one: P_d(k) = (count + 1) / (3 + 3). Dim 0 counts (2, 1, 0); dim 1 counts (0, 1, 2).
    p0, p1 = [3 / 6, 2 / 6, 1 / 6], [1 / 6, 2 / 6, 3 / 6]
    expected = torch.tensor([math.log(p0[0] * p1[2]), math.log(p0[2] * p1[0])], dtype=torch.float64)
    torch.testing.assert_close(independent_pixel_log_prob(train, test, levels=3), expected)
    expected_bpd = -(expected / math.log(2)).mean().item() / 2
    assert independent_pixel_bits_per_dim(train, test, levels=3) == pytest.approx(expected_bpd)
    # alpha = 0.5 (Jeffreys): P_0(0) = 2.5 / 4.5 etc.
    half = independent_pixel_log_prob(train, test[:1], levels=3, alpha=0.5)
    assert float(half) == pytest.approx(math.log(2.5 / 4.5 * 2.5 / 4.5))


def test_independent_pixel_baseline_rejects_model_space_tensors_and_out_of_range_levels():
    with pytest.raises(TypeError, match="integer levels"):
        independent_pixel_log_prob(torch.rand(4, 2), torch.rand(2, 2), levels=3)
    with pytest.raises(ValueError, match="outside"):
        independent_pixel_log_prob(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]), levels=3)


def test_independent_pixel_baseline_on_digits():
    dm = GenerativeDataModule("digits", seed=0)
    dm.setup()
    bpd = independent_pixel_bits_per_dim(dm.splits.train, dm.splits.test, dm.levels)
    assert 2.2 < bpd < 2.6  # well below uniform (log2 17 = 4.09): pixels are far from uniform


# ---- data facts ----
def test_models_accept_the_facts_they_name_and_levels_never_clash_with_glow_levels():
    assert accepted_data_facts(VAE) == ("data_shape", "data_levels", "num_classes")
    assert accepted_data_facts(Diffusion) == ("data_shape", "data_levels", "num_classes")
    assert accepted_data_facts(FlowMatching) == ("data_shape", "num_classes")
    assert "data_levels" not in accepted_data_facts(Glow)  # Glow's own `levels` is its multi-scale depth
    dm = GenerativeDataModule("digits")
    assert data_facts_for(VAE, dm) == {"data_shape": (1, 8, 8), "data_levels": 17, "num_classes": 0}
    assert fill_data_facts(VAE, {"latent_dim": 3}, dm) == {"latent_dim": 3, "data_shape": (1, 8, 8),
                                                             "data_levels": 17, "num_classes": 0}
    with pytest.raises(ValueError, match="data_levels=256.*levels=17"):
        fill_data_facts(VAE, {"data_levels": 256}, dm)
    # A fact recorded for a model that does not take it (LightningCLI saves every link target) is dropped.
    assert fill_data_facts(FlowMatching, {"data_levels": None, "hidden": 8}, dm) == {"hidden": 8,
                                                                                      "data_shape": (1, 8, 8),
                                                                                      "num_classes": 0}


def test_discrete_decoders_without_levels_name_the_fix():
    with pytest.raises(ValueError, match="data_levels.*decoder: gaussian"):
        VAE((2,), decoder="categorical")
    with pytest.raises(ValueError, match="data_levels.*decoder: gaussian"):
        Diffusion((2,), decoder="discretized")
    with pytest.raises(ValueError, match="decoder"):
        VAE((2,), decoder="bernoulli")


def test_cli_links_the_levels_and_a_checkpoint_rebuilds_them(tmp_path, tiny_fit):
    from lightning_flows.checkpoints import CheckpointError, load_model_and_data

    cli = tiny_fit("experiments/digits/vae.yaml", tmp_path, "--model.init_args.decoder", "categorical")
    assert cli.model.data_levels == 17 and cli.model.hparams.data_levels == 17
    ckpt = next(tmp_path.rglob("*.ckpt"))
    model, dm = load_model_and_data(ckpt)
    assert model.data_levels == 17 and model.decoder_kind == "categorical"
    x = dm.split("val")[:4]
    torch.manual_seed(0)
    expected = cli.model.eval().iwae_bound(x, 4)
    torch.manual_seed(0)
    torch.testing.assert_close(model.iwae_bound(x, 4), expected)
    # A checkpoint written before models took `data_levels` gets it from its DataModule ...
    checkpoint = torch.load(ckpt, weights_only=False)
    del checkpoint["hyper_parameters"]["data_levels"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert load_model_and_data(tmp_path / "old.ckpt")[0].data_levels == 17
    # ... and one whose levels contradict its data is refused with both values named.
    checkpoint["hyper_parameters"]["data_levels"] = 256
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match="data_levels=256"):
        load_model_and_data(tmp_path / "edited.ckpt")


# ---- whole decoders: their probabilities over every level vector sum to one ----
def _all_level_vectors(shape, levels):
    dim = math.prod(shape)
    return torch.tensor(list(itertools.product(range(levels), repeat=dim))).reshape(-1, *shape)


@pytest.mark.parametrize("decoder", ["discretized_logistic", "categorical"])
@pytest.mark.parametrize("shape,network", [((2,), "mlp"), ((1, 2, 2), "conv")])
def test_vae_decoder_mass_over_every_level_vector_is_one(decoder, shape, network):
    torch.manual_seed(0)
    levels = 4
    model = VAE(shape, data_levels=levels, latent_dim=3, network=network, hidden=16, base_channels=4,
                decoder=decoder, decoder_scale="predicted").eval()
    k = _all_level_vectors(shape, levels)  # (L^D, *shape)
    x = bin_centre(k, levels)
    cell_volume_log = math.prod(shape) * math.log(2 / levels)
    with torch.no_grad():
        for z in torch.randn(3, 1, 3):
            log_density = model.decoder_log_prob(x, z.expand(len(x), 3))
            total = torch.logsumexp(log_density + cell_volume_log, 0).exp()
            assert float(total) == pytest.approx(1.0, abs=1e-5)
            # The density is constant on each cell: any dequantised point of the cell scores the same.
            x_shifted = dequantise(k, torch.full(k.shape, 0.9), levels)
            torch.testing.assert_close(model.decoder_log_prob(x_shifted, z.expand(len(x), 3)), log_density)


def test_ddpm_discretised_decoder_mass_over_every_level_vector_is_one():
    torch.manual_seed(0)
    levels, shape = 5, (2,)
    model = Diffusion(shape, data_levels=levels, num_steps=50, decoder="discretized", hidden=16, depth=1)
    k = _all_level_vectors(shape, levels)
    x0 = bin_centre(k, levels)
    cell_volume_log = math.prod(shape) * math.log(2 / levels)
    with torch.no_grad():
        for x1 in (torch.zeros(1, 2), torch.tensor([[0.7, -0.99]]), 2 * torch.randn(1, 2)):
            log_density = model.decoder_log_prob(x0, x1.expand(len(x0), 2))
            assert float(torch.logsumexp(log_density + cell_volume_log, 0).exp()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["diffusion", pytest.param("vae", marks=pytest.mark.slow)])
def test_discrete_decoders_under_two_cpu_ranks(tmp_path, family):
    """The levels reach the model on every DDP rank, the replicas' weights stay identical, and DDPM's
    discretised bound and ODE likelihood score the same examples identically on both ranks. (The VAE's
    conv decoder has BatchNorm, whose running statistics are per rank on CPU, where Lightning's
    sync_batchnorm is unavailable; its scores are only checked to be finite.)"""
    import os
    import sys

    probe = Path(__file__).with_name("ddp_discrete_probe.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, str(probe), str(tmp_path), "3", family], timeout=280, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"{family}_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == 2 and rank0["data_levels"] == rank1["data_levels"] == 17
    for name, weight in rank0["parameters"].items():
        assert torch.equal(weight, rank1["parameters"][name]), name
    for kind, score in rank0["scores"].items():
        assert torch.isfinite(score).all() and torch.isfinite(rank1["scores"][kind]).all()
        if family == "diffusion":
            assert torch.equal(score, rank1["scores"][kind]), kind
    assert math.isfinite(float(rank0["bpd"])) and math.isfinite(float(rank1["bpd"]))


@pytest.mark.parametrize("dataset,levels", [("digits", 17), ("mnist5k", 256), ("cifar10", 256)])
def test_image_configs_build_discrete_likelihoods_with_linked_levels(dataset, levels):
    """The committed VAE and diffusion configs of every image dataset (built, not trained: no data is loaded)."""
    from lightning_flows.training import build_cli

    diffusion_decoder = "gaussian" if dataset == "digits" else "discretized"  # see the digits config's header
    for family, decoder_attribute, decoder in (("vae", "decoder_kind", "discretized_logistic"),
                                               ("diffusion", "decoder", diffusion_decoder)):
        config = Path(__file__).parents[1] / f"experiments/{dataset}/{family}.yaml"
        cli = build_cli(["--config", str(config), "--trainer.logger", "false"], run=False)
        assert cli.model.data_levels == levels and getattr(cli.model, decoder_attribute) == decoder
        assert cli.model.hparams.data_levels == levels
