"""The CNF family and flow matching's exact likelihood: normalised densities, MLE training, the CLI."""

import glob
from pathlib import Path

import pytest
import torch

from lightning_flows.cli import main
from lightning_flows.models import CNF, FlowMatching
from lightning_flows.ode import SolverConfig

CHEAP = ["--model.init_args.test_solver", '{"method": "rk4", "steps": 2}',
         "--model.init_args.sampler", '{"method": "rk4", "steps": 2}']


@pytest.fixture(autouse=True)
def one_thread():
    # Many tiny solver steps: with 2 intra-op threads on a busy 2-core machine each op waits on the
    # other thread, which made these tests ~50x slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--sample_grid.n", "16", "--trainer.log_every_n_steps", "1",
        "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "32"]


def _grid_mass(log_prob, half_width: float = 7.0, n: int = 41) -> float:
    """Riemann sum of exp(log_prob) over a square grid: ~1 for a normalised 2D density."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    with torch.no_grad():
        density = log_prob(points).exp()
    return float(density.sum() * (axis[1] - axis[0]) ** 2)


def _perturb(module: torch.nn.Module, scale: float, seed: int = 0) -> None:
    # Random init is close to the identity flow; larger weights make the density visibly non-Gaussian.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_cnf_density_integrates_to_one():
    torch.manual_seed(0)
    model = CNF((2,), hidden=16, depth=2, test_solver={"method": "dopri5", "rtol": 1e-6, "atol": 1e-6}).double()
    _perturb(model, 0.3)
    assert model.likelihood == "exact"
    assert abs(_grid_mass(model.log_prob) - 1.0) < 0.003


def test_flow_matching_log_prob_is_exact_and_normalised():
    torch.manual_seed(0)
    model = FlowMatching((2,), backbone="mlp", hidden=16, depth=2).double()
    _perturb(model, 0.05)
    assert model.likelihood == "exact"
    assert model.likelihood_solver.method == "dopri5" and FlowMatching((2,)).likelihood_solver.rtol == 1e-5
    assert abs(_grid_mass(model.log_prob) - 1.0) < 0.003
    assert model.last_log_prob_nfe > 0


def test_cnf_maximum_likelihood_training_lowers_the_nll():
    torch.manual_seed(0)
    data = torch.randn(256, 2) * 0.5 + torch.tensor([2.0, -1.0])
    model = CNF((2,), hidden=32, depth=2, train_solver={"method": "rk4", "steps": 4}, lr=1e-2)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    eval_solver = SolverConfig("rk4", steps=8)
    with torch.no_grad():
        before = -model.log_prob(data, solver=eval_solver).mean()
    for _ in range(40):
        loss = model.training_loss(data)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = -model.log_prob(data, solver=eval_solver).mean()
    # Before: ~N(0, I) fit to N((2,-1), 0.25 I): NLL ~ 4.7 nats; the true entropy is ~1.45 nats.
    assert after < before - 1.0


def test_cnf_hutchinson_training_and_rnode_terms_run_on_images():
    torch.manual_seed(0)
    model = CNF((1, 4, 4), field="auto", channels=4, depth=1, train_divergence="hutchinson",
                train_solver={"method": "euler", "steps": 3}, kinetic_weight=0.1, jacobian_weight=0.1)
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    loss = model.training_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    samples = model.sample(2, solver=SolverConfig("euler", steps=2))
    assert samples.shape == (2, 1, 4, 4) and model.last_sample_nfe == 2
    assert model.log_prob(x, solver=SolverConfig("euler", steps=2)).shape == (3,)


def test_cnf_rejects_bad_settings():
    with pytest.raises(ValueError, match="exact, hutchinson"):
        CNF((2,), train_divergence="trace")
    with pytest.raises(ValueError, match="rademacher"):
        CNF((2,), probe="uniform")
    with pytest.raises(ValueError, match="auto, mlp, conv"):
        CNF((2,), field="unet")
    with pytest.raises(ValueError, match="field: mlp"):
        CNF((2,), field="conv")
    with pytest.raises(ValueError, match=">= 0"):
        CNF((2,), kinetic_weight=-1.0)


@pytest.mark.parametrize("config", ["experiments/toy2d/cnf.yaml", "experiments/digits/cnf.yaml"])
def test_cnf_config_fits_from_the_cli(tmp_path, fit_args, config):
    main(["fit", "--config", config, *fit_args(*TINY, *CHEAP)])
    checkpoints = glob.glob(f"{tmp_path}/**/checkpoints/*.ckpt", recursive=True)
    assert len(checkpoints) == 1
    metrics = next(Path(tmp_path).glob("**/metrics.csv")).read_text()
    assert "val/loss" in metrics and "train/nll" in metrics
    out = tmp_path / "samples.png"
    main(["sample", "--ckpt", checkpoints[0], "--n", "4", "--out", str(out)])
    assert out.stat().st_size > 500


def test_cnf_in_logit_space_is_a_density_in_model_space_and_samples_back_in_range():
    """With the field at zero the flow is the identity, so log p(x) is the standard normal at z = logit(x)
    plus log|dz/dx|: the closed form of the logit preprocessing, per coordinate."""
    import math

    torch.manual_seed(0)
    model = CNF((1, 2, 2), field="mlp", hidden=8, depth=1, preprocess="logit", logit_alpha=0.05,
                test_solver=SolverConfig("rk4", steps=2))
    for p in model.field.parameters():
        torch.nn.init.zeros_(p)
    x = torch.rand(5, 1, 2, 2) * 1.8 - 0.9
    q = 0.05 + 0.9 * (x + 1) / 2
    z = torch.log(q) - torch.log1p(-q)
    log_dz_dx = math.log(0.9 / 2) - torch.log(q) - torch.log1p(-q)
    expected = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi) + log_dz_dx).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-5, atol=1e-5)
    samples = model.sample(64, solver=SolverConfig("rk4", steps=2))
    assert samples.shape == (64, 1, 2, 2) and samples.min() > -1 and samples.max() < 1
    assert CNF((1, 2, 2), field="mlp", hidden=8, depth=1).preprocess is None  # off unless asked for


def test_cnf_normalizer_starts_at_the_data_gaussian_and_stays_a_density():
    """``normalize: true`` puts an ActNorm (data-initialised per-dimension affine) between the data and the ODE.
    With the field at zero the flow is then exactly the per-dimension Gaussian of the first training batch:
    closed form ``log N(x; mean, std^2)``; sampling inverts the same map; with a non-zero field the model is
    still a normalised density."""
    torch.manual_seed(0)
    mean, std = torch.tensor([1.0, -1.0]), torch.tensor([1.5, 0.7])
    data = mean + std * torch.randn(4096, 2)
    model = CNF((2,), hidden=16, depth=2, normalize=True, test_solver=SolverConfig("rk4", steps=4),
                sampler=SolverConfig("rk4", steps=4))
    for p in model.field.parameters():
        torch.nn.init.zeros_(p)
    model.train()
    model.training_loss(data)  # the first training batch initialises the normalizer
    model.eval()
    batch_mean, batch_std = data.mean(0), data.std(0, unbiased=False)
    x = torch.randn(7, 2) * 2
    expected = torch.distributions.Normal(batch_mean, batch_std).log_prob(x).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected, rtol=1e-4, atol=1e-4)
    samples = model.sample(20_000)
    torch.testing.assert_close(samples.mean(0), batch_mean, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.std(0), batch_std, atol=0.05, rtol=0)
    _perturb(model.field, 0.3)
    model.test_solver = SolverConfig("dopri5", rtol=1e-6, atol=1e-6)
    assert abs(_grid_mass(model.double().log_prob, half_width=9.0, n=61) - 1.0) < 0.005


def test_cnf_likelihood_solver_is_its_test_solver():
    """``likelihood_solver`` (the name flow matching and diffusion use, read and set by
    experiments/benchmarks/likelihood_tolerance.py) is the CNF's test solver: setting it changes ``log_prob``."""
    torch.manual_seed(0)
    model = CNF((2,), hidden=8, depth=1)
    _perturb(model.field, 0.5)
    assert model.likelihood_solver is model.test_solver
    x = torch.randn(5, 2)
    model.likelihood_solver = {"method": "euler", "steps": 1}
    assert model.test_solver == SolverConfig("euler", steps=1)
    one_euler_step = model.log_prob(x)
    torch.testing.assert_close(one_euler_step, model.log_prob(x, solver=SolverConfig("euler", steps=1)))
    assert not torch.allclose(one_euler_step, model.log_prob(x, solver=SolverConfig("rk4", steps=8)))


# --- dropout (issue 21: the digits CNF overfits its 1,437 training images) ----------------------------------------

@pytest.mark.parametrize("frobenius", [False, True])
def test_closed_form_divergence_with_dropout_masks_is_the_brute_force_jacobian_trace_of_the_masked_field(frobenius):
    """With one solve's masks the field is an ordinary smooth field (its sub-network): the closed-form trace and
    Frobenius norm equal the autograd Jacobian's, and Hutchinson's estimate averages to the trace."""
    from lightning_flows.nn.ode_functions import BoundField, ConcatSquashMLP
    from lightning_flows.ode.divergence import exact_divergence

    torch.manual_seed(0)
    field = ConcatSquashMLP((5,), hidden=12, depth=3, dropout=0.5).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    masks = field.draw_dropout_masks(4, x)
    assert len(masks) == 3 and all(m.shape == (4, 12) for m in masks)
    assert set(torch.cat(masks).unique().tolist()) == {0.0, 2.0}  # inverted dropout: kept units scaled by 1/(1-p)
    bound = BoundField(field, masks=masks)
    t = torch.tensor(0.3, dtype=torch.float64)
    v, div, fro = bound.velocity_and_divergence(x, t, frobenius=frobenius)
    def row_jacobian(i):  # row i's field, with row i's masks
        row_field = BoundField(field, masks=[m[i:i + 1] for m in masks])
        return torch.autograd.functional.jacobian(lambda row: row_field(row[None], t)[0], x[i])

    jac = torch.stack([row_jacobian(i) for i in range(len(x))])
    torch.testing.assert_close(v, bound(x, t))
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1))
    torch.testing.assert_close(div, exact_divergence(lambda z: bound(z, t), x)[1])
    assert not torch.allclose(v, field(x, t))  # the masks change the field
    if frobenius:
        torch.testing.assert_close(fro, jac.pow(2).sum((1, 2)))
    probes = torch.randint(0, 2, (4000, 4, 5), dtype=torch.float64) * 2 - 1
    estimates = torch.stack([bound.velocity_and_divergence(x, t, probe=p)[1] for p in probes[:400]])
    assert (estimates.mean(0) - div).abs().max() < 0.2 * div.abs().max() + 0.2


def test_cnf_dropout_trains_on_masked_fields_and_evaluates_the_full_field():
    """In training mode two loss calls on the same batch differ only through fresh masks (the exact trace, fixed
    steps: nothing else is random); in eval mode the loss is deterministic, and log_prob never drops units."""
    torch.manual_seed(0)
    kwargs = dict(field="mlp", hidden=16, depth=2, train_divergence="exact",
                  train_solver={"method": "rk4", "steps": 4, "max_nfe": 32},
                  test_solver={"method": "rk4", "steps": 4, "max_nfe": 32})
    model = CNF((3,), dropout=0.3, **kwargs)
    plain = CNF((3,), **kwargs)
    plain.load_state_dict(model.state_dict())  # dropout adds no parameters
    x = torch.randn(8, 3)
    model.train()
    assert not torch.allclose(model.training_loss(x), model.training_loss(x))
    model.eval(), plain.eval()
    torch.testing.assert_close(model.training_loss(x), model.training_loss(x))
    torch.testing.assert_close(model.training_loss(x), plain.training_loss(x))
    model.train()
    torch.testing.assert_close(model.log_prob(x), plain.eval().log_prob(x))


def test_cnf_dropout_rejects_bad_values_and_the_conv_field():
    with pytest.raises(ValueError, match="dropout must lie in"):
        CNF((3,), field="mlp", dropout=1.0)
    with pytest.raises(ValueError, match="MLP field only"):
        CNF((1, 4, 4), field="conv", dropout=0.1)
    from lightning_flows.nn.ode_functions import ConcatSquashMLP
    field = ConcatSquashMLP((3,), hidden=4, depth=2, dropout=0.2)
    with pytest.raises(ValueError, match="draw them for the solve's batch"):
        field(torch.randn(5, 3), 0.1, masks=field.draw_dropout_masks(4, torch.zeros(1)))
