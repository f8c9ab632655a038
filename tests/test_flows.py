"""Bijective layers: exact inverses, log-determinants against brute-force Jacobians, the lecture's
worked examples rebuilt from layers, and ActNorm's data-dependent init (also across DDP ranks)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from gloo_ranks import run_ranks

from lightning_flows.flows import (ActNorm, AffineCoupling, ConvConditioner, FactorOut, FlowSequence,
                                   InvertibleConv1x1, LogitPreprocess, MLPConditioner, NormalizingFlow, Reshape,
                                   Squeeze, Unsqueeze, channel_mask, checkerboard_mask, vector_mask)


def perturbed(layer: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """``layer`` in float64 with every parameter nudged, so zero-initialised nets are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer.eval()


def image_layers() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    shape = (2, 4, 4)
    return {
        "coupling_checkerboard": (AffineCoupling(checkerboard_mask(shape, 1), ConvConditioner(2, 8)), shape),
        "coupling_channel": (AffineCoupling(channel_mask(shape, 0), ConvConditioner(2, 8)), shape),
        "actnorm_image": (ActNorm(2), shape),
        "invconv_image": (InvertibleConv1x1(2, torch.Generator().manual_seed(1)), shape),
        "squeeze": (Squeeze(), shape),
        "unsqueeze": (Unsqueeze(), (8, 2, 2)),
        "logit": (LogitPreprocess(0.05), shape),
        "factor_out": (FactorOut(AffineCoupling(checkerboard_mask((1, 4, 4), 0), ConvConditioner(1, 8)), keep=1),
                       shape),
        "reshape": (Reshape(shape, (32,)), shape),
    }


def vector_layers() -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    return {
        "coupling_vector_even": (AffineCoupling(vector_mask(5, 0), MLPConditioner(5, 16)), (5,)),
        "coupling_vector_half": (AffineCoupling(vector_mask(5, 3), MLPConditioner(5, 16)), (5,)),
        "actnorm_vector": (ActNorm(5), (5,)),
        "invconv_vector": (InvertibleConv1x1(5, torch.Generator().manual_seed(2)), (5,)),
    }


ALL_LAYERS = {**image_layers(), **vector_layers()}


def random_input(shape, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Inside (-1, 1) so the logit layer is defined; the other layers accept any real input.
    return (torch.rand(n, *shape, generator=gen, dtype=torch.float64) * 2 - 1) * 0.95


def brute_force_log_det(layer, x_single):
    """log|det dz/dx| from the full autograd Jacobian of one example."""
    shape = x_single.shape

    def f(v):
        return layer(v.reshape(1, *shape))[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x_single.reshape(-1), vectorize=True)
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("name", sorted(ALL_LAYERS))
def test_layer_inverts_both_ways(name):
    layer, shape = ALL_LAYERS[name]
    layer = perturbed(layer)
    x = random_input(shape)
    z, log_det = layer(x)
    assert log_det.shape == (x.shape[0],)
    assert torch.allclose(layer.inverse(z), x, atol=1e-5)
    # The other direction: start from a latent-side tensor.
    z2 = random_input(z.shape[1:], seed=1)
    if name == "logit":
        z2 = z2 * 4  # logit space is all of R
    assert torch.allclose(layer(layer.inverse(z2))[0], z2, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL_LAYERS))
def test_layer_log_det_matches_autograd_jacobian(name):
    layer, shape = ALL_LAYERS[name]
    layer = perturbed(layer, seed=3)
    x = random_input(shape, n=2, seed=4)
    _, log_det = layer(x)
    for i in range(x.shape[0]):
        assert log_det[i].item() == pytest.approx(brute_force_log_det(layer, x[i]).item(), abs=1e-4)


def test_coupling_scale_is_bounded_and_layers_start_as_identity():
    # Zero-initialised conditioner: exactly the identity with log-det 0.
    layer = AffineCoupling(vector_mask(4, 0), MLPConditioner(4, 8), scale_bound=1.5).double()
    x = random_input((4,))
    z, log_det = layer(x)
    assert torch.equal(z, x) and torch.equal(log_det, torch.zeros(3, dtype=torch.float64))
    # A huge conditioner output cannot stretch a coordinate beyond exp(scale_bound).
    with torch.no_grad():
        layer.conditioner.out.bias.fill_(1e6)
    _, log_det = layer(x)
    assert (log_det.abs() <= 1.5 * 2 + 1e-9).all()  # two transformed coordinates


def test_masks_partition_coordinates():
    assert checkerboard_mask((1, 2, 2), 0)[0].tolist() == [[1, 0], [0, 1]]
    assert torch.equal(checkerboard_mask((3, 4, 4), 0) + checkerboard_mask((3, 4, 4), 1), torch.ones(3, 4, 4))
    assert channel_mask((4, 2, 2), 0)[:, 0, 0].tolist() == [1, 1, 0, 0]
    assert vector_mask(4, 0).tolist() == [1, 0, 1, 0] and vector_mask(4, 2).tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="squeeze first"):
        channel_mask((1, 4, 4))


def test_squeeze_rejects_odd_sides_with_a_fix():
    with pytest.raises(ValueError, match="fewer multi-scale levels"):
        Squeeze()(torch.zeros(1, 1, 7, 7))


# ---------------- the lecture's worked examples, rebuilt from layers ----------------

def gaussian_log_prob_2d(z):
    return -0.5 * (z ** 2).sum(-1) - math.log(2 * math.pi)


def test_lecture_shear_then_scale_flow_closed_form():
    """Lecture: h = (z1, z2 + a z1); x = (s1 h1 + b1, s2 h2 + b2); det J_g = s1 s2."""
    a, s1, s2, b1, b2 = 0.7, 2.0, 0.5, 1.0, -3.0

    class ShearShift(torch.nn.Module):
        # t(u1) = -a u1 on the second coordinate, no scale: the normalizing direction of the shear.
        def forward(self, kept):
            return torch.stack([torch.zeros_like(kept[:, 0]), torch.zeros_like(kept[:, 0]),
                                torch.zeros_like(kept[:, 0]), -a * kept[:, 0]], dim=1)

    unshear = AffineCoupling(torch.tensor([1.0, 0.0], dtype=torch.float64), ShearShift())
    unscale = ActNorm(2).double()  # z = (x + bias) * exp(log_scale) = (x - b) / sigma
    with torch.no_grad():
        unscale.bias.copy_(torch.tensor([-b1, -b2]))
        unscale.log_scale.copy_(-torch.log(torch.tensor([s1, s2])))
        unscale.initialized.fill_(True)
    flow = NormalizingFlow(FlowSequence([unscale, unshear]), (2,))

    x = torch.randn(64, 2, dtype=torch.float64) * 3
    z1 = (x[:, 0] - b1) / s1
    z2 = (x[:, 1] - b2) / s2 - a * (x[:, 0] - b1) / s1
    closed_form = gaussian_log_prob_2d(torch.stack([z1, z2], 1)) - math.log(s1 * s2)
    assert torch.allclose(flow.log_prob(x), closed_form, atol=1e-12)
    # The log-det of the whole flow is -log(sigma1 sigma2); the shear preserves volume.
    assert torch.allclose(flow(x)[1], torch.full((64,), -math.log(s1 * s2), dtype=torch.float64))
    assert torch.allclose(unshear(x)[1], torch.zeros(64, dtype=torch.float64))
    # Generative direction: x = g(z) exactly as the lecture writes it.
    z = torch.randn(16, 2, dtype=torch.float64)
    expected = torch.stack([s1 * z[:, 0] + b1, s2 * (z[:, 1] + a * z[:, 0]) + b2], 1)
    assert torch.allclose(flow.inverse(z), expected, atol=1e-12)


def test_lecture_linear_map_with_det_5():
    """Lecture: x = A z with A = [[2, 1], [1, 3]], det 5, log p_x(x) = log p_z(A^-1 x) - log 5."""
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    A_inv = torch.tensor([[3.0, -1.0], [-1.0, 2.0]], dtype=torch.float64) / 5  # the lecture's inverse
    layer = InvertibleConv1x1.from_matrix(A_inv).double()  # normalizing direction z = A^-1 x
    flow = NormalizingFlow(FlowSequence([layer]), (2,))
    assert torch.allclose(layer.matrix(), A_inv, atol=1e-12)
    x = torch.randn(32, 2, dtype=torch.float64)
    _, log_det = flow(x)
    assert torch.allclose(log_det, torch.full((32,), -math.log(5.0), dtype=torch.float64), atol=1e-12)
    assert math.isclose(math.log(5.0), 1.609, abs_tol=1e-3)
    expected = gaussian_log_prob_2d(x @ A_inv.T) - math.log(5.0)
    assert torch.allclose(flow.log_prob(x), expected, atol=1e-12)
    z = torch.randn(8, 2, dtype=torch.float64)
    assert torch.allclose(flow.inverse(z), z @ A.T, atol=1e-12)


# ---------------- ActNorm data-dependent initialisation ----------------

def test_actnorm_initialises_to_zero_mean_unit_variance_per_channel():
    x = torch.randn(256, 3, 5, 5, dtype=torch.float64) * torch.tensor([0.1, 4.0, 2.0]).view(1, 3, 1, 1).double() \
        + torch.tensor([5.0, -2.0, 0.3]).view(1, 3, 1, 1).double()
    layer = ActNorm(3).double().train()
    z, _ = layer(x)
    assert bool(layer.initialized)
    per_channel = z.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(per_channel.var(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    # Initialised once: a second, differently distributed batch does not move the parameters.
    before = layer.bias.detach().clone()
    layer(x * 10 + 1)
    assert torch.equal(layer.bias.detach(), before)


def test_actnorm_is_identity_in_eval_before_init_and_flag_survives_state_dict():
    layer = ActNorm(2).eval()
    x = torch.randn(4, 2)
    assert torch.equal(layer(x)[0], x) and not bool(layer.initialized)
    layer.train()(torch.randn(64, 2) * 3 + 1)
    fresh = ActNorm(2).train()
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    fresh(torch.randn(64, 2) * 100)  # must not re-initialise after loading
    assert torch.equal(fresh.bias, layer.bias) and torch.equal(fresh.log_scale, layer.log_scale)


def _ddp_actnorm_worker(rank: int, world: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    flow = FlowSequence([ActNorm(3), AffineCoupling(channel_mask((3, 4, 4)), ConvConditioner(3, 8))]).double()
    model = DistributedDataParallel(flow)
    # Each rank sees a very different shard.
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(8, 3, 4, 4, generator=gen, dtype=torch.float64) * (1 + 4 * rank) + 3 * rank
    z, log_det = model(x)
    (-(z ** 2).mean() + log_det.mean()).backward()
    torch.save({"bias": flow.layers[0].bias.detach(), "log_scale": flow.layers[0].log_scale.detach(), "x": x},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(300)  # spawned ranks import torch afresh: tens of seconds on a busy machine
def test_actnorm_init_identical_across_two_ddp_ranks(tmp_path):
    run_ranks(_ddp_actnorm_worker, str(tmp_path), directory=tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["x"], r1["x"])
    assert torch.equal(r0["bias"], r1["bias"]) and torch.equal(r0["log_scale"], r1["log_scale"])
    # And they are the statistics of the *global* batch, not of either shard.
    both = torch.cat([r0["x"], r1["x"]]).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(r0["bias"], -both.mean(1), atol=1e-10)
    assert torch.allclose(r0["log_scale"], -torch.log(both.std(1, unbiased=False) + 1e-6), atol=1e-10)


def test_actnorm_forward_reads_no_tensor_flag_once_initialised(monkeypatch):
    layer = ActNorm(2).train()
    layer(torch.randn(64, 2))
    reads = []
    original = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or original(self))
    layer(torch.randn(8, 2))
    layer(torch.randn(8, 2))
    monkeypatch.undo()
    assert reads == []  # no host read of the buffer (a device sync on a GPU) in a training forward


def test_actnorm_host_flag_follows_state_dict_loads_both_ways():
    trained = ActNorm(2).train()
    trained(torch.randn(64, 2) * 3 + 1)
    untrained = ActNorm(2)
    layer = ActNorm(2).train()
    layer.load_state_dict(trained.state_dict())
    assert layer._initialized
    layer.load_state_dict(untrained.state_dict())  # an uninitialised state re-arms the data-dependent init
    assert not layer._initialized
    x = torch.randn(64, 2) * 5 - 2
    z, _ = layer(x)
    assert layer._initialized and bool(layer.initialized)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
    # A flag copied into the buffer in place (as an EMA swap does) is picked up without re-initialising.
    other = ActNorm(2).train()
    with torch.no_grad():
        other.initialized.copy_(torch.tensor(True))
        other.bias.fill_(0.5)
    other(x)
    assert other._initialized and torch.equal(other.bias.detach(), torch.full((2,), 0.5))
