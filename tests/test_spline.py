"""Rational-quadratic splines and spline couplings: exact inverse, log-det against autograd, monotone,
knots that tile the interval, identity at initialisation and in the tails."""

from __future__ import annotations

import pytest
import torch

from lightning_flows.flows import (ConvConditioner, MLPConditioner, SplineCoupling, channel_mask, checkerboard_mask,
                                   rational_quadratic_spline, spline_params_per_dim, vector_mask)
from lightning_flows.flows.spline import MIN_BIN_WIDTH, _knots
from test_flows import perturbed as perturbed_flow_layer

BINS, BOUND = 6, 2.5


def random_spline(n: int, seed: int = 0, scale: float = 2.0):
    """Raw spline parameters for ``n`` independent scalar splines, far from the identity."""
    gen = torch.Generator().manual_seed(seed)
    raw = scale * torch.randn(n, spline_params_per_dim(BINS), generator=gen, dtype=torch.float64)
    return raw.split([BINS, BINS, BINS - 1], dim=-1)


def points(n: int, seed: int = 1, spread: float = 1.3) -> torch.Tensor:
    """Points covering the interval and both tails (``spread * BOUND`` on either side)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * spread * BOUND


def test_spline_inverts_and_log_dets_are_opposite():
    widths, heights, slopes = random_spline(2000)
    x = points(2000)
    y, log_det = rational_quadratic_spline(x, widths, heights, slopes, BOUND)
    x_back, inverse_log_det = rational_quadratic_spline(y, widths, heights, slopes, BOUND, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(inverse_log_det, -log_det, atol=1e-8, rtol=0)
    # float32, as in training, inverts to 1e-5 where the inverse is well conditioned (slopes within
    # e^{+-4}; where dy/dx ~ 1e-6 the rounding of y alone moves x by 0.1 in any implementation).
    widths, heights, slopes = (p.float() for p in random_spline(2000, scale=0.5))
    y32, log_det32 = rational_quadratic_spline(x.float(), widths, heights, slopes, BOUND)
    assert log_det32.abs().max() < 4
    x32, _ = rational_quadratic_spline(y32, widths, heights, slopes, BOUND, inverse=True)
    assert (x32 - x.float()).abs().max() < 1e-5


def test_spline_log_det_is_the_log_of_the_autograd_derivative():
    widths, heights, slopes = random_spline(500, seed=2)
    x = points(500, seed=3).requires_grad_()
    y, log_det = rational_quadratic_spline(x, widths, heights, slopes, BOUND)
    (derivative,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the Jacobian is diagonal
    torch.testing.assert_close(log_det, derivative.log(), atol=1e-9, rtol=0)


def test_spline_is_monotone_continuous_and_identity_in_the_tails():
    params = random_spline(1, seed=4)
    widths, heights, slopes = (p.expand(4001, -1) for p in params)
    x = torch.linspace(-1.5 * BOUND, 1.5 * BOUND, 4001, dtype=torch.float64)
    y, _ = rational_quadratic_spline(x, widths, heights, slopes, BOUND)
    assert (y.diff() > 0).all()
    tails = x.abs() > BOUND
    torch.testing.assert_close(y[tails], x[tails])
    # Continuous at every knot (including the ends, where the tails take over): no jump across it.
    _, knots = _knots(params[0], BOUND, MIN_BIN_WIDTH)
    eps = 1e-9
    around = torch.cat([knots[0] - eps, knots[0] + eps])
    n = around.shape[0]
    values, _ = rational_quadratic_spline(around, *(p.expand(n, -1) for p in params), BOUND)
    half = n // 2
    assert (values[half:] - values[:half]).abs().max() < 1e-6
    # the interval maps onto itself
    ends, _ = rational_quadratic_spline(torch.tensor([-BOUND, BOUND], dtype=torch.float64), widths[:2],
                                        heights[:2], slopes[:2], BOUND)
    torch.testing.assert_close(ends, torch.tensor([-BOUND, BOUND], dtype=torch.float64))


def test_bins_tile_the_interval_and_respect_the_minimum_width():
    widths, _, _ = random_spline(100, seed=5, scale=20.0)  # extreme logits: some bins at the floor
    sizes, knots = _knots(widths, BOUND, MIN_BIN_WIDTH)
    assert sizes.shape == (100, BINS) and knots.shape == (100, BINS + 1)
    torch.testing.assert_close(sizes.sum(-1), torch.full((100,), 2 * BOUND, dtype=torch.float64))
    assert (knots[:, 0] == -BOUND).all() and (knots[:, -1] == BOUND).all()
    assert (sizes >= 2 * BOUND * MIN_BIN_WIDTH * (1 - 1e-9)).all()
    with pytest.raises(ValueError, match="fewer bins"):
        _knots(torch.zeros(1, 1000, dtype=torch.float64), BOUND, MIN_BIN_WIDTH)


def perturbed(layer: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``layer`` in float64, nudged further than the affine layers' tests do, so the splines bend visibly."""
    return perturbed_flow_layer(layer, seed, scale=0.5)


def couplings() -> dict[str, tuple[SplineCoupling, tuple[int, ...]]]:
    per = spline_params_per_dim(BINS)
    image = (2, 4, 4)
    return {
        "vector": (SplineCoupling(vector_mask(3, 0), MLPConditioner(3, 16, params_per_dim=per), BINS, BOUND), (3,)),
        "vector_half": (SplineCoupling(vector_mask(4, 3), MLPConditioner(4, 16, params_per_dim=per), BINS, BOUND),
                        (4,)),
        "checkerboard": (SplineCoupling(checkerboard_mask(image, 1), ConvConditioner(2, 8, params_per_dim=per),
                                        BINS, BOUND), image),
        "channel": (SplineCoupling(channel_mask(image, 0), ConvConditioner(2, 8, params_per_dim=per), BINS, BOUND),
                    image),
    }


def coupling_input(shape, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, *shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1.2 * BOUND  # tails included


@pytest.mark.parametrize("name", sorted(couplings()))
def test_coupling_inverts_and_its_log_det_matches_the_autograd_jacobian(name):
    layer, shape = couplings()[name]
    layer = perturbed(layer)
    x = coupling_input(shape)
    z, log_det = layer(x)
    assert not torch.allclose(z, x)  # a real transformation, not the identity
    torch.testing.assert_close(layer.inverse(z), x, atol=1e-5, rtol=0)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, *shape))[0].reshape(-1),
                                                 x[i].reshape(-1), vectorize=True)
        assert log_det[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-6)
    # Kept coordinates pass through unchanged.
    kept = layer.mask.bool().expand_as(x)
    assert torch.equal(z[kept], x[kept])


def test_coupling_starts_as_the_identity():
    per = spline_params_per_dim(BINS)
    layer = SplineCoupling(vector_mask(4, 0), MLPConditioner(4, 8, params_per_dim=per), BINS, BOUND).double()
    x = coupling_input((4,))
    z, log_det = layer(x)
    torch.testing.assert_close(z, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_bad_spline_settings_name_the_fix():
    with pytest.raises(ValueError, match="at least 2 bins"):
        SplineCoupling(vector_mask(2, 0), MLPConditioner(2, 8), bins=1)
    with pytest.raises(ValueError, match="bound > 0"):
        SplineCoupling(vector_mask(2, 0), MLPConditioner(2, 8), bound=0.0)
