"""bits/dim against hand computations."""

import math

import pytest
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.metrics import bits_per_dim


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_uniform_density_on_the_dequantised_cube_is_log2_levels(levels):
    # Uniform on [-1, 1]^D has density 2^-D, so NLL = D log 2 nats in model space.
    dim = 64
    nll = dim * math.log(2.0)
    assert bits_per_dim(nll, dim, levels, preprocess_log_det=dim * math.log(2.0)) == pytest.approx(math.log2(levels))


def test_datamodule_uses_its_own_quantisation():
    dm = GenerativeDataModule("digits")
    assert dm.levels == 17 and dm.dim == 64
    assert dm.bits_per_dim(dm.dim * math.log(2.0)) == pytest.approx(math.log2(17))  # 4.087


def test_standard_gaussian_model_on_gaussian_data_matches_the_closed_form():
    # Continuous data: bpd is the entropy rate in bits; for N(0, I) it is log2(2 pi e) / 2 per dim.
    dim, n = 4, 200_000
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nll = 0.5 * (x**2).sum(1) + 0.5 * dim * math.log(2 * math.pi)
    bpd = bits_per_dim(nll, dim).mean().item()
    expected = 0.5 * math.log2(2 * math.pi * math.e)
    standard_error = (0.5 * (x**2).sum(1) / (dim * math.log(2))).std().item() / math.sqrt(n)
    assert abs(bpd - expected) < 4 * standard_error


def test_bits_per_dim_keeps_tensor_shape():
    nll = torch.tensor([10.0, 20.0])
    out = bits_per_dim(nll, dim=10)
    assert out.shape == (2,)
    assert torch.allclose(out, nll / (10 * math.log(2)))
