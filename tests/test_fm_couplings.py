"""Flow-matching couplings, path, time sampling and the background batch pipeline."""

import gc
import itertools
import threading

import pytest
import torch

from lightning_flows.flow_matching import (
    BackgroundBatches, FlowMatchingBatch, IndependentCoupling, MinibatchOTCoupling, TimeSampler, TrainingBatchDraw,
    batch_generator, linear_path, ot_permutation,
)
from lightning_flows.models import FlowMatching


def _transport_cost(x0, x1, perm):
    return (x0[list(perm)] - x1).pow(2).sum().item()


@pytest.mark.parametrize("seed", range(5))
def test_ot_pairing_is_the_cost_minimising_permutation_of_6_points(seed):
    generator = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(6, 2, generator=generator), 2 * torch.randn(6, 2, generator=generator) + 1
    perm = ot_permutation(x0, x1).tolist()
    brute = min(itertools.permutations(range(6)), key=lambda p: _transport_cost(x0, x1, p))
    assert perm == list(brute)
    assert _transport_cost(x0, x1, perm) < _transport_cost(x0, x1, range(6))


def test_ot_blocks_are_each_paired_exactly_and_keep_to_themselves():
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(7, 3, generator=generator), torch.randn(7, 3, generator=generator)
    perm = ot_permutation(x0, x1, block_size=3).tolist()  # blocks [0, 3), [3, 6), [6, 7)
    for start, stop in [(0, 3), (3, 6), (6, 7)]:
        block = perm[start:stop]
        assert sorted(block) == list(range(start, stop))
        candidates = itertools.permutations(range(start, stop))
        best = min(candidates, key=lambda p: (x0[list(p)] - x1[start:stop]).pow(2).sum().item())
        assert block == list(best)


def test_ot_coupling_only_permutes_the_noise_and_shortens_the_paths():
    x1 = torch.randn(256, 2) * 3
    x0_ot, x1_ot = MinibatchOTCoupling(block_size=64)(x1, torch.Generator().manual_seed(1))
    x0_ind, _ = IndependentCoupling()(x1, torch.Generator().manual_seed(1))
    assert torch.equal(x1_ot, x1)
    # Same draw, re-ordered: the noise marginal is untouched.
    assert torch.equal(x0_ot[x0_ot[:, 0].argsort()], x0_ind[x0_ind[:, 0].argsort()])
    assert (x0_ot - x1).pow(2).sum() < 0.6 * (x0_ind - x1).pow(2).sum()


def test_ot_pairing_rejects_mismatched_or_non_finite_batches():
    with pytest.raises(ValueError, match="equally many"):
        ot_permutation(torch.zeros(4, 2), torch.zeros(5, 2))
    bad = torch.zeros(4, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ot_permutation(torch.zeros(4, 2), bad)
    with pytest.raises(ValueError, match="ot_block_size must be >= 1"):
        MinibatchOTCoupling(0)


def test_sigma_zero_independent_target_is_exactly_x1_minus_x0():
    x1 = torch.randn(32, 2)
    batch = TrainingBatchDraw(IndependentCoupling(), TimeSampler(), sigma=0.0)(x1, torch.Generator().manual_seed(0))
    assert batch.path_noise is None and torch.equal(batch.x1, x1)
    xt, target = linear_path(batch.x0, batch.x1, batch.t)
    assert torch.equal(target, x1 - batch.x0)
    assert torch.allclose(xt, (1 - batch.t[:, None]) * batch.x0 + batch.t[:, None] * x1)
    # ...and the model regresses exactly that target.
    model = FlowMatching(data_shape=(2,), hidden=8, depth=1)
    expected = (model.velocity(xt, batch.t) - (x1 - batch.x0)).pow(2).mean()
    assert torch.equal(model.regression_loss(batch), expected)


def test_gaussian_path_widens_the_line_but_keeps_the_target():
    x0, x1, t, eps = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8), torch.randn(8, 2)
    line, target0 = linear_path(x0, x1, t)
    xt, target = linear_path(x0, x1, t, sigma=0.3, noise=eps)
    assert torch.allclose(xt - line, 0.3 * eps) and torch.equal(target, target0)
    with pytest.raises(ValueError, match="needs the Gaussian noise"):
        linear_path(x0, x1, t, sigma=0.3)
    batch = TrainingBatchDraw(IndependentCoupling(), TimeSampler(), sigma=0.3)(x1)
    assert batch.path_noise.shape == x1.shape


def test_logit_normal_times_have_the_requested_location_and_scale():
    t = TimeSampler("logit_normal", mean=0.5, std=0.8)(20_000, torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.8) < 0.03
    uniform = TimeSampler()(20_000, torch.Generator().manual_seed(0))
    assert abs(uniform.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="Unknown time_sampling 'beta'"):
        TimeSampler("beta")


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match="Unknown coupling 'sinkhorn'"):
        FlowMatching(coupling="sinkhorn")
    with pytest.raises(ValueError, match="needs teacher_ckpt"):
        FlowMatching(coupling="reflow")
    with pytest.raises(ValueError, match="sigma"):
        FlowMatching(sigma=-1.0)


# ---- the background pipeline ----

def _ot_draw():
    return TrainingBatchDraw(MinibatchOTCoupling(8), TimeSampler(), sigma=0.0)


def _batches(n=6, size=16):
    return [torch.randn(size, 2, generator=torch.Generator().manual_seed(i)) for i in range(n)]


@pytest.mark.parametrize("threads", [1, 3])
def test_background_batches_equal_the_inline_ones_whatever_the_threads(threads):
    data = _batches()
    inline = list(BackgroundBatches(data, _ot_draw(), seed=5, threads=0))
    background = list(BackgroundBatches(data, _ot_draw(), seed=5, threads=threads))
    assert len(inline) == len(background) == len(data)
    for a, b in zip(inline, background):
        assert isinstance(b, FlowMatchingBatch)
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3]))
    # Batch i of the epoch is exactly the draw from its own generator.
    expected = _ot_draw()(data[2], batch_generator(5, 0, 0, 2))
    assert torch.equal(background[2].x0, expected.x0) and torch.equal(background[2].t, expected.t)


def test_background_batches_change_with_epoch_seed_and_rank():
    data = _batches(2)
    stage = BackgroundBatches(data, _ot_draw(), seed=5)
    first, second = list(stage), list(stage)
    assert not torch.equal(first[0].x0, second[0].x0)  # a new epoch, new noise
    other_seed = list(BackgroundBatches(data, _ot_draw(), seed=6))
    assert not torch.equal(first[0].x0, other_seed[0].x0)
    rank0, rank1 = batch_generator(5, 0, 0, 0), batch_generator(5, 0, 1, 0)
    assert not torch.equal(torch.randn(4, generator=rank0), torch.randn(4, generator=rank1))


def test_background_batches_follow_the_loaders_epoch_counter():
    class Loader(list):
        epoch = 7

    data = Loader(_batches(1))
    out = next(iter(BackgroundBatches(data, _ot_draw(), seed=0)))
    assert torch.equal(out.x0, _ot_draw()(data[0], batch_generator(0, 7, 0, 0)).x0)


def _pipeline_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("batch-prep")]


def test_background_batches_stop_their_threads_and_surface_errors():
    gc.collect()  # iterators abandoned by earlier tests shut their pools down when collected
    iterator = iter(BackgroundBatches(_batches(20), _ot_draw(), seed=0, threads=2))
    next(iterator)
    assert _pipeline_threads()
    iterator.close()  # what a trainer stopping mid-epoch does
    for thread in _pipeline_threads():
        thread.join(timeout=5)
    assert not _pipeline_threads()

    def broken(batch, generator):
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        list(BackgroundBatches(_batches(3), broken, seed=0, threads=1))
    with pytest.raises(ValueError, match="pairing_threads must be >= 0"):
        BackgroundBatches([], broken, threads=-1)


def _train(model, dm, steps, lr=3e-3):
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for batch in dm.train_dataloader():
            loss = model.training_loss(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            done += 1
            if done == steps:
                break


def test_ot_coupling_makes_one_euler_step_sample_far_better_than_independent():
    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.metrics import energy_distance
    from lightning_flows.ode import SolverConfig

    dm = GenerativeDataModule("8gaussians", batch_size=256)
    test, one_step = dm.split("test")[:2000], SolverConfig("euler", steps=1)
    distances = {}
    for coupling in ("independent", "ot"):
        torch.manual_seed(0)
        model = FlowMatching(data_shape=(2,), hidden=64, depth=2, coupling=coupling)
        _train(model, dm, steps=300)
        distances[coupling] = energy_distance(model.sample(2000, solver=one_step), test).item()
    # Independent pairs learn the averaged (curved) field: one step lands near the data mean.
    assert distances["ot"] < 0.2 * distances["independent"], distances  # measured: 0.064 vs 0.84
