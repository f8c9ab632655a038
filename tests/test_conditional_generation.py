"""Class-conditional flow matching and diffusion with classifier-free guidance (issue 14)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from subprocess_runs import run as run_process
from lightning_flows.checkpoints import load_model_and_data
from lightning_flows.data import GenerativeDataModule
from lightning_flows.flow_matching import MinibatchOTCoupling, TimeSampler, TrainingBatchDraw
from lightning_flows.models import Diffusion, FlowMatching
from lightning_flows.nn.class_conditioning import drop_labels, guided
from lightning_flows.ode import SolverConfig
from test_conditional_data import _label_of_image, _levels, _pixel_keys

PROBE = Path(__file__).with_name("cfg_ddp_probe.py")
IMAGE = (1, 8, 8)


def small_fm(**kwargs) -> FlowMatching:
    torch.manual_seed(0)
    return FlowMatching(data_shape=IMAGE, base_channels=8, channel_mults=(1, 2), num_classes=10, **kwargs)


def small_diffusion(**kwargs) -> Diffusion:
    torch.manual_seed(0)
    return Diffusion(data_shape=IMAGE, base_channels=8, channel_mults=(1, 2), num_steps=20, num_classes=10, **kwargs)


class CountCalls:
    """Counts a module's forward calls and the batch sizes they saw."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_hook(lambda mod, args, out: self.sizes.append(args[0].shape[0]))


def test_label_dropout_replaces_labels_by_the_null_class_at_the_configured_rate():
    y = torch.randint(10, (200_000,), generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.3):
        dropped = drop_labels(y, p, 10, torch.Generator().manual_seed(1))
        null = dropped == 10
        assert abs(null.float().mean().item() - p) < 0.005
        assert torch.equal(dropped[~null], y[~null])
    assert torch.equal(drop_labels(y, 0.0, 10), y)


@pytest.mark.parametrize("family", ["flow_matching", "diffusion"])
def test_training_applies_label_dropout_at_its_rate(family):
    model = small_fm(label_dropout=0.25) if family == "flow_matching" else small_diffusion(label_dropout=0.25)
    network = model.velocity if family == "flow_matching" else model.eps_model
    seen = []
    network.class_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    x, y = torch.rand(4000, *IMAGE) * 2 - 1, torch.randint(10, (4000,))
    model.training_loss(x, y)
    labels = seen[0]
    assert abs((labels == 10).float().mean().item() - 0.25) < 0.03
    assert torch.equal(labels[labels != 10], y[labels != 10])


@pytest.mark.parametrize("t", [0.3, torch.rand(6)])
def test_guidance_w1_is_the_conditional_field_w0_the_unconditional_and_one_forward_equals_two(t):
    model = small_fm().eval()
    x, y, null = torch.randn(6, *IMAGE), torch.randint(10, (6,)), torch.full((6,), 10)
    with torch.no_grad():
        conditional, unconditional = model(x, t, y), model(x, t, null)
        assert torch.equal(model.guided_field(y, 1.0)(x, t), conditional)
        assert torch.equal(model.guided_field(y, 0.0)(x, t), unconditional)
        assert torch.equal(model(x, t), unconditional)  # no labels: the null class
        calls = CountCalls(model.velocity)
        for w in (2.0, 4.0, -0.5):
            one_forward = model.guided_field(y, w)(x, t)
            torch.testing.assert_close(one_forward, unconditional + w * (conditional - unconditional),
                                       atol=1e-5, rtol=1e-5)
        assert calls.sizes == [12, 12, 12]  # one call per evaluation, on the doubled batch


def test_guided_combination_at_w1_and_w0_through_the_doubled_batch_matches_the_branches():
    # The doubled-batch path itself (bypassing the w = 1 / w = 0 shortcuts) reproduces each branch.
    model = small_diffusion().eval()
    x, t, y = torch.randn(5, *IMAGE), torch.randint(1, 21, (5,)), torch.randint(10, (5,))
    with torch.no_grad():
        near_one = guided(model, x, t, y, 1.0 + 1e-7, 10)
        near_zero = guided(model, x, t, y, 1e-7, 10)
        torch.testing.assert_close(near_one, model(x, t, y), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(near_zero, model(x, t), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_diffusion_guidance_costs_one_forward_per_step_and_w1_is_conditional_sampling(sampler):
    model = small_diffusion().eval()
    y = torch.arange(4)
    calls = CountCalls(model.eps_model)
    torch.manual_seed(3)
    guided_samples = model.sample(4, y=y, guidance=3.0, sampler=sampler, steps=5)
    assert calls.sizes == [8] * model.last_sample_nfe and torch.isfinite(guided_samples).all()
    # w = 1 draws the conditional model: the same samples as the reverse process run on eps(x, t, y) by hand.
    torch.manual_seed(3)
    conditional = model.sample(4, y=y, guidance=1.0, sampler=sampler, steps=5)
    torch.manual_seed(3)
    x = torch.randn(4, *IMAGE)
    with model._conditioned(y, 1.0):
        by_hand = model._ancestral(x) if sampler == "ancestral" else model._ddim(x, 5)
    assert torch.equal(conditional, by_hand)
    assert not torch.allclose(conditional, guided_samples)


def test_flow_matching_sampling_follows_the_requested_classes_and_counts_one_forward_per_step():
    model = small_fm(sampler=SolverConfig("euler", steps=4)).eval()
    calls = CountCalls(model.velocity)
    samples = model.sample(3, y=torch.tensor([7, 7, 1]), guidance=2.0)
    assert samples.shape == (3, *IMAGE) and model.last_sample_nfe == 4 and calls.sizes == [6] * 4
    torch.manual_seed(0)
    by_class = model.sample(2, y=torch.tensor([0, 0]))
    torch.manual_seed(0)
    other = model.sample(2, y=torch.tensor([5, 5]))
    assert not torch.allclose(by_class, other)  # the label reaches the field
    assert model.sample(5).shape == (5, *IMAGE)  # y=None: uniform classes, for unconditional callers


def test_flow_matching_conditional_log_prob_is_a_normalised_density_per_class():
    # A 2D conditional field: exp(log p(x | y)) integrates to 1 over the plane for every class.
    torch.manual_seed(0)
    model = FlowMatching(data_shape=(2,), hidden=32, depth=2, num_classes=3,
                         likelihood_solver={"method": "rk4", "steps": 16}).eval()
    with torch.no_grad():
        for layer in model.velocity.mlp.hidden:
            layer.weight.mul_(0.5)
    side = torch.linspace(-6, 6, 61)
    grid = torch.cartesian_prod(side, side)
    cell = (side[1] - side[0]) ** 2
    masses = []
    for label in range(3):
        log_p = model.log_prob(grid, y=torch.full((len(grid),), label))
        masses.append((log_p.exp().sum() * cell).item())
    assert all(abs(m - 1) < 0.02 for m in masses), masses
    # The label reaches the density.
    x = torch.randn(8, 2)
    assert not torch.allclose(model.log_prob(x, y=torch.zeros(8, dtype=torch.long)),
                              model.log_prob(x, y=torch.ones(8, dtype=torch.long)))


def test_diffusion_conditional_log_prob_bound_takes_the_labels():
    model = small_diffusion(bound_timesteps=4).eval()
    x, y = torch.rand(3, *IMAGE) * 2 - 1, torch.tensor([1, 2, 3])
    torch.manual_seed(0)
    a = model.log_prob(x, y=y)
    torch.manual_seed(0)
    b = model.log_prob(x, y=torch.tensor([4, 5, 6]))
    assert a.shape == (3,) and torch.isfinite(a).all() and not torch.allclose(a, b)


def test_ot_coupling_keeps_every_label_with_its_data_and_reflow_with_labels_is_refused():
    x1, y = torch.randn(16, 2), torch.arange(16) % 10
    batch = TrainingBatchDraw(MinibatchOTCoupling(8), TimeSampler())((x1, y), torch.Generator().manual_seed(0))
    assert batch.x1 is x1 and batch.y is y
    with pytest.raises(ValueError, match="reflow"):
        FlowMatching(data_shape=(2,), num_classes=3, coupling="reflow", teacher_ckpt="teacher.ckpt")


def test_unconditional_models_refuse_labels_and_guidance_with_the_fix():
    fm = FlowMatching(data_shape=(2,), hidden=8, depth=1)
    with pytest.raises(ValueError, match="unconditional"):
        fm.sample(2, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance=1.0"):
        fm.sample(2, guidance=2.0)
    with pytest.raises(ValueError, match="data.conditional: false"):
        fm.training_step((torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), 0)
    diffusion = Diffusion(data_shape=(2,), hidden=8, depth=1, num_steps=10)
    with pytest.raises(ValueError, match="unconditional"):
        diffusion.sample(2, guidance=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        small_fm().sample(2, y=torch.tensor([3, 10]))


def test_conditional_checkpoint_rebuilds_a_conditional_datamodule_and_model(tmp_path):
    L.seed_everything(0)
    dm = GenerativeDataModule("digits", batch_size=32, conditional=True)
    model = FlowMatching(data_shape=dm.data_shape, num_classes=dm.num_classes, base_channels=8, channel_mults=(1, 2),
                         label_dropout=0.2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    path = tmp_path / "cond.ckpt"
    trainer.save_checkpoint(path)
    loaded, data = load_model_and_data(path)
    assert data.conditional and data.num_classes == 10 and loaded.num_classes == 10 and loaded.label_dropout == 0.2
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x = torch.randn(2, *IMAGE)
    y = torch.tensor([3, 4])
    torch.testing.assert_close(loaded.guided_field(y, 2.0)(x, 0.5), model.guided_field(y, 2.0)(x, 0.5))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["flow_matching", pytest.param("diffusion", marks=pytest.mark.slow)])
def test_two_gloo_ranks_train_on_their_own_labelled_shards_and_end_identical(tmp_path, family):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, str(PROBE), str(tmp_path), family, "3"], timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["y"].shape == (48,) and not torch.equal(ranks[0]["x"], ranks[1]["x"])
    dm = GenerativeDataModule("digits", conditional=True)
    table = _label_of_image("train")
    for rank in ranks:  # every label is its own image's label
        assert all(label in table[key] for key, label in zip(_pixel_keys(_levels(dm, rank["x"])), rank["y"].tolist()))
    for name, weight in ranks[0]["state_dict"].items():
        assert torch.equal(weight, ranks[1]["state_dict"][name]), name
