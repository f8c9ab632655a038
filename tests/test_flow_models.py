"""RealNVP, Glow and NSF as whole models: exact inverses, exact log-densities, sampling, the CLI."""

from __future__ import annotations

import glob
import math

import pytest
import torch

from lightning_flows.cli import main
from lightning_flows.models import NSF, Glow, RealNVP

SMALL = dict(steps=2, hidden=8, depth=2)
CASES = {
    "realnvp_vector": (RealNVP, (3,), {}),
    "glow_vector": (Glow, (3,), {}),
    "realnvp_multiscale": (RealNVP, (1, 4, 4), dict(levels=2)),
    "glow_multiscale": (Glow, (1, 4, 4), dict(levels=2)),
    "realnvp_flattened_image": (RealNVP, (1, 4, 4), dict(architecture="mlp")),
    "glow_flattened_image": (Glow, (1, 4, 4), dict(architecture="mlp")),
    "nsf_vector": (NSF, (3,), dict(spline_bins=4)),
    "nsf_multiscale": (NSF, (1, 4, 4), dict(levels=2, spline_bins=4, spline_bound=1.5)),
    "nsf_vector_plain": (NSF, (3,), dict(actnorm=False, invertible_linear=False)),
    "nsf_multiscale_plain": (NSF, (1, 4, 4), dict(levels=2, spline_bins=4, actnorm=False, invertible_linear=False)),
    "realnvp_spline_vector": (RealNVP, (3,), dict(coupling="spline", spline_bins=5)),
    "realnvp_spline_multiscale": (RealNVP, (1, 4, 4), dict(coupling="spline", spline_bins=3)),
}


def build(name: str, seed: int = 0):
    """A small float64 model with ActNorm initialised on data and every weight nudged off its init."""
    cls, shape, kwargs = CASES[name]
    torch.manual_seed(seed)
    model = cls(data_shape=shape, **SMALL, **kwargs).double()
    model.train()
    model.log_prob(random_examples(shape, 64, seed + 1))  # data-dependent ActNorm init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval(), shape


def random_examples(shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.95


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_inverts_both_ways(name):
    model, shape = build(name)
    x = random_examples(shape, 5)
    z, _ = model.flow(x)
    assert torch.allclose(model.flow.inverse(z), x, atol=1e-5)
    z2 = torch.randn(5, *shape, dtype=torch.float64)
    assert torch.allclose(model.flow(model.flow.inverse(z2))[0], z2, atol=1e-5)


@pytest.mark.parametrize("name", ["realnvp_multiscale", "glow_multiscale", "glow_vector", "nsf_vector",
                                  "nsf_multiscale", "nsf_multiscale_plain", "realnvp_spline_multiscale"])
def test_model_log_det_matches_autograd_jacobian_and_log_prob_is_change_of_variables(name):
    model, shape = build(name, seed=3)
    x = random_examples(shape, 2, seed=5)
    z, log_det = model.flow(x)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: model.flow(v.reshape(1, *shape))[0].reshape(-1),
                                                 x[i].reshape(-1), vectorize=True)
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-4)
    base = -0.5 * z.reshape(2, -1).pow(2).sum(1) - 0.5 * math.log(2 * math.pi) * z[0].numel()
    assert torch.allclose(model.log_prob(x), base + log_det, atol=1e-10)
    assert model.likelihood == "exact"


@pytest.mark.parametrize("cls", [RealNVP, Glow, NSF])
def test_2d_density_integrates_to_one(cls):
    torch.manual_seed(0)
    model = cls(data_shape=(2,), steps=3, hidden=16).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.eval()
    grid = torch.linspace(-12, 12, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        mass = model.log_prob(points).exp().sum() * (grid[1] - grid[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=0.02)


def test_sample_shape_temperature_and_cost():
    model, shape = build("glow_multiscale")
    torch.manual_seed(0)
    samples = model.sample(512, temperature=0.5)
    assert samples.shape == (512, *shape) and model.last_sample_nfe == 1
    latent, _ = model.flow(samples)
    assert latent.std().item() == pytest.approx(0.5, rel=0.1)
    # Temperature 0 is the image of the latent mode, the same for every draw.
    cold = model.sample(3, temperature=0.0)
    assert torch.allclose(cold[0], cold[1])


def test_bad_configurations_name_the_fix():
    with pytest.raises(ValueError, match="lower `levels`"):
        Glow(data_shape=(1, 28, 28), levels=3)
    with pytest.raises(ValueError, match="Choose one of"):
        RealNVP(data_shape=(2,), architecture="convolutional")
    with pytest.raises(ValueError, match="architecture='mlp' for vectors"):
        RealNVP(data_shape=(2,), architecture="multiscale")
    with pytest.raises(ValueError, match="affine, spline"):
        Glow(data_shape=(2,), coupling="cubic")
    with pytest.raises(ValueError, match="spline_bins >= 2"):
        RealNVP(data_shape=(2,), coupling="spline", spline_bins=1)


def test_nsf_checkpoint_rebuilds_an_nsf_with_spline_couplings(tmp_path):
    from lightning_flows.checkpoints import load_model_and_data
    from lightning_flows.flows import SplineCoupling

    main(["fit", "--config", "experiments/toy2d/nsf.yaml", "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
          "--trainer.check_val_every_n_epoch", "1", "--sample_grid.n", "4", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    checkpoint = glob.glob(f"{tmp_path}/**/checkpoints/*.ckpt", recursive=True)[0]
    model, datamodule = load_model_and_data(checkpoint)
    assert type(model) is NSF and any(isinstance(m, SplineCoupling) for m in model.modules())
    assert torch.isfinite(model.log_prob(datamodule.split("test")[:8])).all()


TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--model.init_args.steps", "1", "--model.init_args.hidden", "8",
        "--sample_grid.n", "4", "--trainer.log_every_n_steps", "1"]


@pytest.mark.parametrize("family", ["realnvp", "glow", "nsf"])
def test_cli_fit_on_digits_logs_bpd_and_checkpoint_keeps_actnorm_initialised(tmp_path, fit_args, family):
    from lightning_flows.checkpoints import load_model_and_data

    main(["fit", "--config", f"experiments/digits/{family}.yaml", *fit_args(*TINY)])
    metrics = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)[0]
    header, *rows = open(metrics).read().splitlines()
    assert "val/bpd" in header and "train/skipped_steps" in header
    bpd = [float(v) for row in rows for k, v in zip(header.split(","), row.split(",")) if k == "val/bpd" and v]
    assert bpd and all(math.isfinite(b) for b in bpd)
    checkpoint = glob.glob(f"{tmp_path}/**/checkpoints/*.ckpt", recursive=True)[0]
    model, datamodule = load_model_and_data(checkpoint)
    flags = [v for k, v in model.state_dict().items() if k.endswith("initialized")]
    assert flags and all(bool(f) for f in flags)
    assert torch.isfinite(model.log_prob(datamodule.split("test")[:8])).all()


@pytest.mark.parametrize("config", ["experiments/toy2d/realnvp.yaml", "experiments/toy2d/glow.yaml",
                                    "experiments/toy2d/nsf.yaml", "experiments/mnist5k/nsf.yaml"])
def test_flow_configs_fit_and_score_finite_likelihoods(config, tmp_path, tiny_fit):
    cli = tiny_fit(config, tmp_path, "--model.init_args.steps", "1", "--model.init_args.hidden", "8")
    assert cli.trainer.global_step == 2
    nll = cli.trainer.callback_metrics["val/nll"]
    assert torch.isfinite(nll)
    assert cli.model.lr_schedule == ("cosine" if "toy2d" in config else "constant")
