"""The coloured exact trace: coordinates that never interact share one vector-Jacobian product.

The colouring is a promise about the field's Jacobian (zero between different coordinates of one colour); these
tests check the promise against the brute-force Jacobian for the conv field that makes it, and the coloured trace
against the uncoloured one and the brute force, through the ODE likelihood too.
"""

import functools

import pytest
import torch

from lightning_flows.nn.ode_functions import ConcatConvField, LabelledField
from lightning_flows.ode import (
    SolverConfig, brute_force_divergence, exact_divergence, local_colouring, ode_log_likelihood,
)


def _jacobians(field, z: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians ``(B, D, D)`` by autograd, one example at a time."""
    return torch.stack([torch.autograd.functional.jacobian(lambda x: field(x[None])[0].flatten(), z[i]).flatten(1)
                        for i in range(z.shape[0])])


def _same_colour_pairs(colouring: torch.Tensor) -> torch.Tensor:
    same = colouring[:, None] == colouring[None, :]
    return same & ~torch.eye(len(colouring), dtype=torch.bool)


@pytest.mark.parametrize("shape, depth", [((1, 8, 8), 3), ((2, 6, 10), 1), ((1, 12, 12), 2)])
def test_the_conv_fields_colouring_is_true_of_its_jacobian(shape, depth):
    torch.manual_seed(0)
    net = ConcatConvField(shape, channels=3, depth=depth).double()
    z = torch.randn(2, *shape, dtype=torch.float64)
    jac = _jacobians(lambda x: net(x, 0.4), z)
    colouring = net.divergence_colouring(shape)
    pairs = _same_colour_pairs(colouring)
    assert pairs.any(), "the colouring should save passes on these shapes"
    assert jac[:, pairs].abs().max() == 0  # structurally zero, not merely small
    # The check has power: one pixel less of reach than the field has puts interacting pixels in one colour.
    too_small = _same_colour_pairs(local_colouring(shape, radius=depth))
    assert jac[:, too_small].abs().max() > 1e-6


@pytest.mark.parametrize("per_example_time", [False, True])
def test_the_conv_field_is_the_convolution_of_the_image_and_a_constant_time_channel(per_example_time):
    """The field splits each layer into the image's convolution plus ``t`` times the time kernel's map of ones (16
    input channels instead of 17, for speed); that is the layer it is defined as, conv([h, t]) with zero padding."""
    torch.manual_seed(0)
    net = ConcatConvField((2, 6, 7), channels=5, depth=2, num_classes=3).double()
    for shifts in net.class_shifts:  # trained shifts are nonzero; they must land after each convolution
        torch.nn.init.normal_(shifts)
    x = torch.randn(4, 2, 6, 7, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    t = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64) if per_example_time else torch.tensor(0.7).double()
    t_channel = torch.as_tensor(t).expand(4)[:, None, None, None].expand(4, 1, 6, 7)
    h = x
    for i, conv in enumerate(net.convs):
        h = conv(torch.cat([h, t_channel], dim=1)) + net.class_shifts[i][y][:, :, None, None]
        h = net.act(h) if i < len(net.convs) - 1 else h
    assert torch.allclose(net(x, t, y), h, rtol=1e-12, atol=1e-12)


def test_local_colouring_counts():
    assert int(local_colouring((1, 8, 8), radius=4).max()) + 1 == 25  # the digits field: 25 passes, not 64
    assert int(local_colouring((3, 8, 8), radius=1).max()) + 1 == 12  # channels of one pixel never share
    assert int(local_colouring((1, 4, 4), radius=9).max()) + 1 == 16  # reach beyond the image: no saving
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        local_colouring((64,), radius=2)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16])
def test_the_coloured_trace_equals_the_brute_force_one(chunk_size):
    torch.manual_seed(1)
    net = ConcatConvField((1, 8, 8), channels=4, depth=2, num_classes=3).double()
    with torch.no_grad():
        for shift in net.class_shifts:
            shift.normal_()
    z = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    for field in (LabelledField(net), LabelledField(net, y)):
        colouring = field.divergence_colouring((1, 8, 8))
        velocity = functools.partial(field, t=0.7)
        _, brute = brute_force_divergence(velocity, z)
        out, coloured, _ = exact_divergence(velocity, z, chunk_size=chunk_size, colouring=colouring)
        _, plain, _ = exact_divergence(velocity, z, chunk_size=chunk_size)
        torch.testing.assert_close(coloured, brute, atol=1e-10, rtol=0)
        torch.testing.assert_close(plain, brute, atol=1e-10, rtol=0)
        torch.testing.assert_close(out, field(z, 0.7))


def test_frobenius_ignores_the_colouring_and_a_wrong_size_is_refused():
    torch.manual_seed(2)
    net = ConcatConvField((1, 6, 6), channels=3, depth=1).double()
    z = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    field = lambda x: net(x, 0.2)  # noqa: E731
    colouring = net.divergence_colouring((1, 6, 6))
    _, div, fro = exact_divergence(field, z, frobenius=True, colouring=colouring)
    expected_fro = _jacobians(field, z).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(fro, expected_fro, atol=1e-10, rtol=0)
    torch.testing.assert_close(div, brute_force_divergence(field, z)[1], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="colouring has 35 entries for 36 coordinates"):
        exact_divergence(field, z, colouring=colouring[:-1])


def test_the_ode_likelihood_uses_the_fields_colouring_and_gets_the_same_value():
    torch.manual_seed(3)
    net = ConcatConvField((1, 8, 8), channels=4, depth=3).double()
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    solver = SolverConfig(method="rk4", steps=3)
    calls = []
    colour = net.divergence_colouring

    def counting_colouring(shape):
        calls.append(shape)
        return colour(shape)

    net.divergence_colouring = counting_colouring
    with torch.no_grad():
        coloured = ode_log_likelihood(net, z, solver).log_prob
    assert calls and all(shape == (1, 8, 8) for shape in calls)
    uncoloured_field = lambda x, t: net(x, t)  # noqa: E731  (no divergence_colouring: one pass per coordinate)
    with torch.no_grad():
        plain = ode_log_likelihood(uncoloured_field, z, solver).log_prob
    torch.testing.assert_close(coloured, plain, atol=1e-9, rtol=0)


def test_the_coloured_trace_trains_like_the_brute_force_one():
    # Training with the exact trace (train_divergence: exact) differentiates through it: same gradients.
    torch.manual_seed(4)
    net = ConcatConvField((1, 6, 6), channels=3, depth=2).double()
    z = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    field = functools.partial(net, t=0.3)
    _, coloured, _ = exact_divergence(field, z, chunk_size=4, colouring=net.divergence_colouring((1, 6, 6)))
    _, brute = brute_force_divergence(field, z)
    params = list(net.parameters())  # the last bias does not move the trace: no gradient either way
    got = torch.autograd.grad(coloured.sum(), params, allow_unused=True)
    want = torch.autograd.grad(brute.sum(), params, allow_unused=True)
    assert [g is None for g in got] == [w is None for w in want] and sum(w is not None for w in want) == 5
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
