"""The class-conditional CNF (issue 21 item 4): the label shifts every layer of the field (MLP or conv) over a per-class
Gaussian base. ``log p(x | y)`` is an exact, normalised density per class whose closed-form divergence equals the
brute-force Jacobian trace of the labelled field; ``log p(x)`` is the explicit mixture over the classes; samples of
class c are the class-c ODE from class-c base draws; ``num_classes = 0`` is today's model."""

from __future__ import annotations

import pytest
import torch

import lightning_flows.models.cnf as cnf_module
from lightning_flows.models import CNF
from lightning_flows.nn.ode_functions import BoundField, ConcatConvField, ConcatSquashMLP, LabelledField
from lightning_flows.ode import SolverConfig
from lightning_flows.ode.divergence import exact_divergence

K = 3
TIGHT = {"method": "dopri5", "rtol": 1e-7, "atol": 1e-7, "max_nfe": 5000}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny solver steps: a second intra-op thread only waits
    yield
    torch.set_num_threads(threads)


def conditional_cnf(shape=(2,), **kwargs) -> CNF:
    """A conditional CNF in float64 whose class shifts and bases are nudged away from zero (a fresh one starts as
    the unconditional model, which would make every class test trivially pass)."""
    torch.manual_seed(0)
    model = CNF(shape, field="mlp", hidden=16, depth=2, num_classes=K, test_solver=TIGHT, sampler=TIGHT,
                **kwargs).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shift in model.field.class_shifts:
            shift.copy_(torch.randn(shift.shape, generator=gen, dtype=shift.dtype))
        model.class_base.loc.copy_(0.5 * torch.randn(model.class_base.loc.shape, generator=gen, dtype=torch.float64))
        model.class_base.log_scale.copy_(0.2 * torch.randn(model.class_base.loc.shape, generator=gen,
                                                           dtype=torch.float64))
    return model.eval()


@pytest.mark.parametrize("frobenius", [False, True])
def test_closed_form_divergence_of_the_labelled_field_is_the_brute_force_jacobian_trace(frobenius):
    torch.manual_seed(0)
    field = ConcatSquashMLP((6,), hidden=12, depth=2, num_classes=K).double()
    with torch.no_grad():
        for shift in field.class_shifts:
            shift.normal_()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    labelled = BoundField(field, y)
    velocity, divergence, fro = labelled.velocity_and_divergence(x, torch.tensor(0.3, dtype=torch.float64),
                                                                 frobenius=frobenius, chunk_size=4)
    def one_example_jacobian(i: int) -> torch.Tensor:  # (6, 6), the example's own label
        return torch.autograd.functional.jacobian(lambda v: field(v[None], 0.3, y[i:i + 1])[0], x[i])

    jacobians = torch.stack([one_example_jacobian(i) for i in range(5)])
    torch.testing.assert_close(velocity, field(x, 0.3, y))
    torch.testing.assert_close(divergence, jacobians.diagonal(dim1=1, dim2=2).sum(1))
    if frobenius:
        torch.testing.assert_close(fro, jacobians.pow(2).sum((1, 2)))
    # The same as the generic torch.func trace of the labelled field, and the label changes the field.
    reference = exact_divergence(lambda z: field(z, 0.3, y), x)[1]
    torch.testing.assert_close(divergence, reference)
    assert (field(x, 0.3, y) - field(x, 0.3, (y + 1) % K)).abs().amin() > 1e-6


def test_each_class_density_integrates_to_one_and_the_classes_differ():
    model = conditional_cnf()
    axis = torch.linspace(-8, 8, 81, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    cell = (axis[1] - axis[0]) ** 2
    with torch.no_grad():
        per_class = model.log_prob_every_class(points)  # (N, K)
    for c in range(K):
        assert per_class[:, c].exp().sum().item() * cell == pytest.approx(1.0, abs=5e-3), c
    assert (per_class[:, 0] - per_class[:, 1]).abs().max() > 0.1


@pytest.mark.parametrize("rows_per_pass", [4096, 4])
def test_log_p_x_is_the_explicit_mixture_of_per_class_solves(monkeypatch, rows_per_pass):
    monkeypatch.setattr(cnf_module, "MARGINAL_ROWS_PER_PASS", rows_per_pass)  # several passes of the K classes
    # A fixed-step solver: an adaptive one picks its steps from the whole batch, so K classes solved together take
    # other steps than each class alone (the values then agree only to the tolerance).
    model, fixed = conditional_cnf(), SolverConfig("rk4", steps=8)
    x = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        per_class = [model.log_prob(x, torch.full((5,), c), solver=fixed) for c in range(K)]
        explicit = torch.logsumexp(torch.stack(per_class, 1), 1) - torch.log(torch.tensor(float(K)))
        torch.testing.assert_close(model.log_prob(x, solver=fixed), explicit, rtol=0, atol=1e-7)
        torch.testing.assert_close(model.log_prob_every_class(x, fixed), torch.stack(per_class, 1), rtol=0, atol=1e-7)
        # With the adaptive test solver, to its tolerance.
        torch.testing.assert_close(model.log_prob(x), explicit, rtol=0, atol=1e-4)


def test_samples_of_class_c_solve_the_class_c_ode_from_class_c_base_draws():
    model = conditional_cnf()
    y = torch.tensor([2, 0, 1, 2])
    torch.manual_seed(5)
    eps = torch.randn(4, 2, dtype=torch.float64)
    torch.manual_seed(5)
    x = model.sample(4, y)
    # Back through the class-y ODE to t = 0: the class-y base draw it came from.
    from lightning_flows.ode import integrate
    z0 = integrate(BoundField(model.field, y), x, SolverConfig(**TIGHT), 1.0, 0.0).states
    base = model.class_base
    torch.testing.assert_close((z0 - base.loc[y]) / base.log_scale[y].exp(), eps, rtol=0, atol=1e-5)
    assert model.sample(7).shape == (7, 2)  # no labels: uniform classes drawn by the model


def test_num_classes_zero_keeps_the_state_dict_and_a_fresh_conditional_model_starts_as_it():
    torch.manual_seed(0)
    plain = CNF((1, 4, 4), field="mlp", hidden=8, depth=2, preprocess="logit", normalize=True).double()
    torch.manual_seed(0)
    conditional = CNF((1, 4, 4), field="mlp", hidden=8, depth=2, preprocess="logit", normalize=True,
                      num_classes=K).double()
    extra = set(conditional.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith(("field.class_shifts.", "class_base.")) for k in extra)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(conditional.state_dict()[name], value, rtol=0, atol=0)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        plain.log_prob(x)  # data-dependent ActNorm init, then the same on both
        conditional.log_prob(x, torch.zeros(4, dtype=torch.long))
        conditional.normalizer.load_state_dict(plain.normalizer.state_dict())
        expected = plain.log_prob(x)
        torch.testing.assert_close(conditional.log_prob(x, torch.tensor([0, 1, 2, 0])), expected)
        torch.testing.assert_close(conditional.log_prob(x), expected)  # the mixture of identical classes


def test_a_conditional_cnf_trains_on_labelled_batches_with_gradients_in_the_class_weights():
    model = conditional_cnf(train_solver={"method": "rk4", "steps": 2}, kinetic_weight=0.01, jacobian_weight=0.01,
                            train_divergence="hutchinson").train()
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.randint(K, (8,))
    loss = model.training_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.class_base.loc.grad.abs().sum() > 0
    assert all(shift.grad.abs().sum() > 0 for shift in model.field.class_shifts)


def test_labels_and_guidance_are_checked_with_the_fix_named():
    plain = CNF((2,), hidden=8, depth=1)
    with pytest.raises(ValueError, match="data.conditional"):
        plain.log_prob(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="data.conditional"):
        conditional_cnf().training_loss(torch.randn(2, 2, dtype=torch.float64))  # a batch without labels
    with pytest.raises(ValueError, match="guidance"):
        conditional_cnf().sample(2, guidance=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        conditional_cnf().log_prob(torch.randn(2, 2, dtype=torch.float64), torch.tensor([0, 3]))
    assert conditional_cnf().sampling_ode() is None and plain.sampling_ode() is not None


def test_validation_reports_the_marginal_and_the_class_given_nll():
    model = conditional_cnf()
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        loss = model._step((x, y), "val")
        marginal, given = -model.log_prob(x).mean(), -model.log_prob(x, y).mean()
    assert float(loss) == pytest.approx(float(marginal), abs=1e-6) == logged["val/loss"]
    assert logged["val/nll_given_class"] == pytest.approx(float(given), abs=1e-6)


def test_the_conv_field_is_conditioned_the_same_way_and_its_class_densities_are_exact():
    """The conv field (the digits CNF's): the class shifts start at zero (the unconditional field), the label then
    changes the field, and the conditional model's per-class log-density and marginal use the field's exact trace."""
    torch.manual_seed(0)
    plain = ConcatConvField((1, 4, 4), channels=4, depth=2).double()
    torch.manual_seed(0)
    field = ConcatConvField((1, 4, 4), channels=4, depth=2, num_classes=K).double()
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    torch.testing.assert_close(field(x, 0.3, y), plain(x, 0.3), rtol=0, atol=0)
    with torch.no_grad():
        for shift in field.class_shifts:
            shift.normal_()
    assert (field(x, 0.3, y) - field(x, 0.3, (y + 1) % K)).abs().amin() > 1e-6
    labelled = LabelledField(field, y)
    assert not hasattr(labelled, "velocity_and_divergence")  # the generic trace, not the MLP's closed form
    _, divergence, _ = exact_divergence(lambda z: labelled(z, 0.3), x)
    def one_example_trace(i: int) -> torch.Tensor:  # the example's own label
        return torch.trace(torch.autograd.functional.jacobian(
            lambda v: field(v.reshape(1, 1, 4, 4), 0.3, y[i:i + 1]).reshape(16), x[i].reshape(16)))

    brute = torch.stack([one_example_trace(i) for i in range(3)])
    torch.testing.assert_close(divergence, brute)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, 0.3, y)

    torch.manual_seed(0)
    model = CNF((1, 4, 4), field="conv", channels=4, depth=1, num_classes=K, test_solver=TIGHT,
                sampler=TIGHT).double().eval()
    with torch.no_grad():
        for shift in model.field.class_shifts:
            shift.normal_()
    fixed = SolverConfig("rk4", steps=8)
    with torch.no_grad():
        per_class = [model.log_prob(x, torch.full((3,), c), solver=fixed) for c in range(K)]
        explicit = torch.logsumexp(torch.stack(per_class, 1), 1) - torch.log(torch.tensor(float(K)))
        torch.testing.assert_close(model.log_prob(x, solver=fixed), explicit, rtol=0, atol=1e-7)
    assert (per_class[0] - per_class[1]).abs().max() > 1e-3
    loss = model.train().training_loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and all(shift.grad.abs().sum() > 0 for shift in model.field.class_shifts)
    assert model.sample(3, y).shape == (3, 1, 4, 4)
