"""Divergence estimators: exact trace (torch.func), Hutchinson, and the brute-force reference."""

import math

import pytest
import torch

from lightning_flows.nn.ode_functions import ConcatConvField, ConcatSquashMLP
from lightning_flows.ode import brute_force_divergence, exact_divergence, hutchinson_divergence, sample_probe


def _linear_field(dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return a, (lambda z: z @ a.T)


def test_exact_divergence_of_linear_field_is_trace():
    a, field = _linear_field(5)
    z = torch.randn(7, 5, dtype=torch.float64)
    out, div, fro = exact_divergence(field, z, frobenius=True)
    torch.testing.assert_close(out, field(z))
    assert torch.allclose(div, torch.trace(a).expand(7), atol=1e-6, rtol=0)
    assert torch.allclose(fro, a.pow(2).sum().expand(7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_mean_converges_to_trace(kind):
    # A statistical bound, not a tolerance: the mean of n independent unbiased estimates lies within
    # 4 standard errors of Tr(A) with probability > 0.9999 (and the generator is seeded).
    a, field = _linear_field(6, seed=1)
    n = 20_000
    z = torch.randn(n, 6, dtype=torch.float64)
    probe = sample_probe(z, kind, torch.Generator().manual_seed(2))
    _, estimates, fro = hutchinson_divergence(field, z, probe, frobenius=True)
    standard_error = estimates.std() / math.sqrt(n)
    assert abs(estimates.mean() - torch.trace(a)) < 4 * standard_error
    fro_se = fro.std() / math.sqrt(n)
    assert abs(fro.mean() - a.pow(2).sum()) < 4 * fro_se
    # The bound has power: a probe with E[v v^T] = 1.21 I (biased by 21%) fails it.
    _, biased, _ = hutchinson_divergence(field, z, 1.1 * probe)
    assert abs(biased.mean() - torch.trace(a)) > 4 * biased.std() / math.sqrt(n)


def test_probes_have_identity_second_moment():
    z = torch.zeros(50_000, 3)
    rad = sample_probe(z, "rademacher", torch.Generator().manual_seed(0))
    assert set(rad.unique().tolist()) == {-1.0, 1.0}
    for kind in ("rademacher", "gaussian"):
        v = sample_probe(z, kind, torch.Generator().manual_seed(0))
        torch.testing.assert_close(v.T @ v / len(v), torch.eye(3), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="rademacher"):
        sample_probe(z, "uniform")


def test_exact_divergence_of_mlp_equals_autograd_jacobian_trace():
    torch.manual_seed(0)
    net = ConcatSquashMLP((3,), hidden=16, depth=2).double()
    z = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    _, div, _ = exact_divergence(lambda x: net(x, t), z)
    expected = torch.stack([
        torch.trace(torch.autograd.functional.jacobian(lambda x: net(x[None], t)[0], z[i])) for i in range(4)
    ])
    torch.testing.assert_close(div, expected, atol=1e-10, rtol=0)
    _, brute = brute_force_divergence(lambda x: net(x, t), z)
    torch.testing.assert_close(brute, expected, atol=1e-10, rtol=0)


def test_exact_divergence_of_conv_field_matches_brute_force_and_chunks():
    torch.manual_seed(0)
    net = ConcatConvField((1, 4, 4), channels=4, depth=1).double()
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    field = lambda x: net(x, 0.5)  # noqa: E731
    _, div, _ = exact_divergence(field, z)
    _, div_chunked, _ = exact_divergence(field, z, chunk_size=5)
    _, brute = brute_force_divergence(field, z)
    torch.testing.assert_close(div, brute, atol=1e-10, rtol=0)
    torch.testing.assert_close(div_chunked, brute, atol=1e-10, rtol=0)


def test_exact_divergence_is_differentiable_in_parameters():
    torch.manual_seed(0)
    net = ConcatSquashMLP((2,), hidden=8, depth=1).double()
    z = torch.randn(5, 2, dtype=torch.float64)
    _, div, _ = exact_divergence(lambda x: net(x, 0.1), z)
    grads = torch.autograd.grad(div.sum(), list(net.parameters()), allow_unused=True)
    _, brute = brute_force_divergence(lambda x: net(x, 0.1), z)
    brute_grads = torch.autograd.grad(brute.sum(), list(net.parameters()), allow_unused=True)
    for g, b in zip(grads, brute_grads):
        if b is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("activation", ["softplus", "tanh", "silu"])
@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("per_example_time", [False, True])
def test_concat_squash_closed_form_divergence_equals_the_autograd_jacobian(activation, depth, per_example_time):
    """ConcatSquashMLP's forward-mode Jacobian (what the CNF trains and evaluates with) gives exactly the values and
    the parameter gradients of the torch.func trace and the brute-force Jacobian, with or without column chunks."""
    torch.manual_seed(0)
    net = ConcatSquashMLP((3,), hidden=8, depth=depth, activation=activation).double()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.7)  # non-trivial gates, shifts and curvature
    z = torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) if per_example_time else torch.tensor(0.3, dtype=torch.float64)
    ref_out, ref_div, ref_fro = exact_divergence(lambda x: net(x, t), z, frobenius=True)
    _, brute = brute_force_divergence(lambda x: net(x, t), z)
    torch.testing.assert_close(ref_div, brute, atol=1e-10, rtol=0)
    ref_grads = torch.autograd.grad((ref_div + ref_fro).sum(), list(net.parameters()), allow_unused=True)
    for chunk in (None, 2):
        out, div, fro = net.velocity_and_divergence(z, t, frobenius=True, chunk_size=chunk)
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
        torch.testing.assert_close(div, ref_div, atol=1e-12, rtol=0)
        torch.testing.assert_close(fro, ref_fro, atol=1e-12, rtol=0)
        grads = torch.autograd.grad((div + fro).sum(), list(net.parameters()), allow_unused=True)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(torch.zeros(()) if g is None else g, torch.zeros(()) if ref is None else ref,
                                       atol=1e-12, rtol=0)
    assert net.velocity_and_divergence(z, t)[2] is None
    # With a probe v: Hutchinson's v^T J v and ||J v||^2, against the brute-force Jacobian.
    v = sample_probe(z, "rademacher", torch.Generator().manual_seed(1))
    times = t.expand(len(z))
    jac = torch.stack([torch.autograd.functional.jacobian(lambda q, s=s: net(q[None], s)[0], x)
                       for x, s in zip(z, times)])
    jv = torch.einsum("bij,bj->bi", jac, v)
    out, est, fro = net.velocity_and_divergence(z, t, frobenius=True, probe=v)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(est, (jv * v).sum(1), atol=1e-12, rtol=0)
    torch.testing.assert_close(fro, jv.pow(2).sum(1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_cnf_dynamics_use_the_closed_form_and_keep_the_likelihood(divergence):
    """The augmented dynamics take the field's closed-form trace when it has one: the same log-likelihood as the
    torch.func trace (Hutchinson: the same estimate for the same probe), and the closed form is what runs."""
    from lightning_flows.ode import SolverConfig, ode_log_likelihood

    torch.manual_seed(0)
    net = ConcatSquashMLP((2,), hidden=8, depth=2).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    solver = SolverConfig("rk4", steps=4)
    calls = []
    closed_form = net.velocity_and_divergence
    net.velocity_and_divergence = lambda *a, **k: calls.append(1) or closed_form(*a, **k)
    kwargs = dict(divergence=divergence, kinetic_energy=True, jacobian_frobenius=divergence == "exact")
    fast = ode_log_likelihood(net, x, solver, generator=torch.Generator().manual_seed(3), **kwargs)
    assert len(calls) == 16  # 4 rk4 steps x 4 evaluations

    def generic(z, t):  # the same field without the closed form: the torch.func trace
        return net(z, t)

    ref = ode_log_likelihood(generic, x, solver, generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(fast.log_prob, ref.log_prob, atol=1e-12, rtol=0)
    torch.testing.assert_close(fast.kinetic_energy, ref.kinetic_energy, atol=1e-12, rtol=0)
    if divergence == "exact":
        torch.testing.assert_close(fast.jacobian_frobenius, ref.jacobian_frobenius, atol=1e-12, rtol=0)


def test_fast_softplus_is_softplus_with_its_derivatives():
    from lightning_flows.nn.ode_functions import FastSoftplus

    x = torch.linspace(-120, 120, 20001, dtype=torch.float64, requires_grad=True)
    y = FastSoftplus()(x)
    torch.testing.assert_close(y, torch.logaddexp(x, torch.zeros(())), atol=1e-12, rtol=0)  # log(1 + e^x)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.sigmoid(x), atol=1e-12, rtol=0)
    (second,) = torch.autograd.grad(grad.sum(), x)  # double backward (the torch.func trace's training gradient)
    torch.testing.assert_close(second, torch.sigmoid(x) * (1 - torch.sigmoid(x)), atol=1e-12, rtol=0)
    assert torch.isfinite(FastSoftplus()(torch.tensor([-1e4, 1e4]))).all()
