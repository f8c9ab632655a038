"""The digits CNF's field, conv + MLP: its exact trace (the conv's coloured passes plus the MLP's closed form), its
Hutchinson and Frobenius terms and their gradients equal the brute-force Jacobian's; the CNF built on it is a density
whose likelihood matches the generic trace's through the ODE."""

import functools

import pytest
import torch

from lightning_flows.models.cnf import CNF
from lightning_flows.nn.ode_functions import ConvPlusMLPField
from lightning_flows.ode import SolverConfig, brute_force_divergence, ode_log_likelihood, sample_probe


def _field(num_classes: int = 0, seed: int = 0) -> ConvPlusMLPField:
    torch.manual_seed(seed)
    return ConvPlusMLPField((1, 6, 6), channels=3, hidden=16, depth=2, num_classes=num_classes).double()


def _jacobians(f, z: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians ``(B, D, D)`` by autograd, one example at a time."""
    return torch.stack([torch.autograd.functional.jacobian(lambda x: f(x[None])[0].flatten(), z[i]).flatten(1)
                        for i in range(z.shape[0])])


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_the_exact_trace_is_the_brute_force_one_and_the_velocity_the_sum(chunk_size):
    field = _field()
    z = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    f = functools.partial(field, t=0.4)
    velocity, divergence, fro = field.velocity_and_divergence(z, 0.4, chunk_size=chunk_size)
    _, brute = brute_force_divergence(f, z)
    torch.testing.assert_close(velocity, field.conv(z, 0.4) + field.mlp(z, 0.4), atol=0, rtol=0)
    torch.testing.assert_close(divergence, brute, atol=1e-10, rtol=0)
    assert fro is None
    # Both parts contribute: neither trace alone is the whole one.
    _, conv_only = brute_force_divergence(functools.partial(field.conv, t=0.4), z)
    assert (divergence - conv_only).abs().min() > 1e-4


def test_the_frobenius_norm_and_hutchinsons_estimate_are_those_of_the_summed_jacobian():
    field = _field(seed=1)
    z = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    jac = _jacobians(functools.partial(field, t=0.7), z)
    _, divergence, fro = field.velocity_and_divergence(z, 0.7, frobenius=True, chunk_size=8)
    torch.testing.assert_close(divergence, jac.diagonal(dim1=1, dim2=2).sum(1), atol=1e-10, rtol=0)
    torch.testing.assert_close(fro, jac.pow(2).sum((1, 2)), atol=1e-10, rtol=0)
    probe = sample_probe(z, "rademacher", torch.Generator().manual_seed(0))
    _, estimate, fro_estimate = field.velocity_and_divergence(z, 0.7, frobenius=True, probe=probe)
    v = probe.flatten(1)
    torch.testing.assert_close(estimate, torch.einsum("bi,bij,bj->b", v, jac, v), atol=1e-10, rtol=0)
    torch.testing.assert_close(fro_estimate, torch.einsum("bi,bij->bj", v, jac).pow(2).sum(1), atol=1e-10, rtol=0)


def test_training_through_the_exact_trace_has_the_brute_force_gradients():
    field = _field(seed=2)
    z = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    _, divergence, _ = field.velocity_and_divergence(z, 0.2, chunk_size=7)
    _, brute = brute_force_divergence(functools.partial(field, t=0.2), z)
    params = [p for p in field.parameters()]
    got = torch.autograd.grad(divergence.sum(), params, allow_unused=True)
    want = torch.autograd.grad(brute.sum(), params, allow_unused=True)
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_labels_shift_both_parts_and_the_labelled_trace_is_exact():
    field = _field(num_classes=3, seed=3)
    for p in field.parameters():  # move the class shifts off their zero start
        if p.ndim == 2 and p.shape[0] == 3:
            torch.nn.init.normal_(p, std=0.3)
    z, y = torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    assert not torch.allclose(field(z, 0.5, y), field(z, 0.5))
    _, divergence, _ = field.velocity_and_divergence(z, 0.5, y=y)
    _, brute = brute_force_divergence(lambda x: field(x, 0.5, y), z)
    torch.testing.assert_close(divergence, brute, atol=1e-10, rtol=0)


def test_the_cnf_on_it_has_the_generic_traces_likelihood_and_refuses_dropout():
    torch.manual_seed(5)
    model = CNF((1, 6, 6), field="conv_mlp", channels=3, hidden=16, depth=2).double()
    assert isinstance(model.field, ConvPlusMLPField)
    z = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    solver = SolverConfig(method="rk4", steps=3)
    with torch.no_grad():
        fast = ode_log_likelihood(model.field, z, solver).log_prob
        generic = ode_log_likelihood(lambda x, t: model.field(x, t), z, solver).log_prob  # one VJP per pixel
    torch.testing.assert_close(fast, generic, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="dropout is implemented for the MLP field only"):
        CNF((1, 6, 6), field="conv_mlp", dropout=0.1)
