"""Reflow pairs and the flow-matching options end to end through the YAML configs and the CLI."""

import glob
from pathlib import Path

import pytest
import torch

from lightning_flows.checkpoints import CheckpointError, load_model_and_data
from lightning_flows.data.loader import InMemoryBatches
from lightning_flows.flow_matching import (
    BackgroundBatches, MinibatchOTCoupling, PairedCoupling, generate_reflow_pairs, load_teacher,
)
from lightning_flows.models import FlowMatching
from lightning_flows.ode import ODEStepLimitExceeded, SolverConfig, integrate

TOY = "experiments/toy2d/flow_matching.yaml"
OT = "experiments/toy2d/flow_matching_ot.yaml"
REFLOW = "experiments/toy2d/flow_matching_reflow.yaml"


def _only(pattern: str) -> Path:
    matches = glob.glob(pattern, recursive=True)
    assert len(matches) == 1, f"expected one match for {pattern}, got {matches}"
    return Path(matches[0])


def _teacher():
    torch.manual_seed(0)
    return FlowMatching(data_shape=(2,), hidden=16, depth=1)


def test_reflow_pairs_are_deterministic_for_a_seed_and_follow_the_teachers_ode():
    teacher, solver = _teacher(), SolverConfig("rk4", steps=3)
    x0, x1 = generate_reflow_pairs(teacher.velocity, (2,), 50, solver, seed=3, batch_size=16)
    again = generate_reflow_pairs(teacher.velocity, (2,), 50, solver, seed=3, batch_size=16)
    other = generate_reflow_pairs(teacher.velocity, (2,), 50, solver, seed=4, batch_size=16)
    assert x0.shape == x1.shape == (50, 2)
    assert torch.equal(x0, again[0]) and torch.equal(x1, again[1])
    assert not torch.allclose(x0, other[0])
    with torch.no_grad():
        assert torch.allclose(x1, integrate(teacher.velocity, x0, solver).states, atol=1e-6)
    # Two ranks split the same blocks between them: together they hold exactly the single-process pairs.
    shards = [generate_reflow_pairs(teacher.velocity, (2,), 50, solver, seed=3, batch_size=16, rank=r, world_size=2)
              for r in (0, 1)]
    assert sum(len(s[0]) for s in shards) == 50
    together = torch.cat([shards[0][0][:13], shards[1][0][:13], shards[0][0][13:], shards[1][0][13:]])
    assert torch.equal(together, x0)  # blocks of 13, 13, 12, 12: rank 0 holds blocks 0, 2; rank 1 blocks 1, 3


def test_reflow_pair_generation_is_bounded():
    with pytest.raises(ODEStepLimitExceeded):
        generate_reflow_pairs(_teacher().velocity, (2,), 8, SolverConfig("rk4", steps=3, max_nfe=5))


def test_paired_coupling_draws_teacher_pairs():
    x0, x1 = torch.randn(10, 2), torch.randn(10, 2)
    pair0, pair1 = PairedCoupling(x0, x1)(torch.zeros(6, 2), torch.Generator().manual_seed(0))
    assert pair0.shape == (6, 2)
    for a, b in zip(pair0, pair1):  # every drawn x0 comes with its own x1
        row = (x0 == a).all(1).nonzero().item()
        assert torch.equal(x1[row], b)
    with pytest.raises(ValueError, match="same data"):
        PairedCoupling(x0, x1)(torch.zeros(6, 3))


def test_reflow_from_the_cli_trains_on_teacher_pairs_and_samples_in_one_step(tmp_path, tiny_fit):
    tiny_fit(TOY, tmp_path / "teacher")
    teacher_ckpt = _only(f"{tmp_path}/teacher/**/checkpoints/*.ckpt")
    cli = tiny_fit(REFLOW, tmp_path / "student", "--model.init_args.teacher_ckpt", str(teacher_ckpt),
                   "--model.init_args.reflow_pairs", "300", "--model.init_args.reflow_solver.steps", "3")
    student = cli.model
    assert cli.trainer.global_step == 2
    assert isinstance(cli.trainer.train_dataloader, BackgroundBatches)
    pairs = student.draw_batch.coupling
    assert isinstance(pairs, PairedCoupling) and len(pairs) == 300
    teacher, _ = load_model_and_data(teacher_ckpt)
    with torch.no_grad():
        expected = integrate(teacher.velocity, pairs.x0, SolverConfig("midpoint", steps=3)).states
    assert torch.allclose(pairs.x1, expected, atol=1e-5)
    student.sample(8)
    assert student.last_sample_nfe == 1
    # The student's checkpoint rebuilds without touching the teacher (pairs are only made when fitting).
    student_ckpt = _only(f"{tmp_path}/student/**/checkpoints/*.ckpt")
    teacher_ckpt.unlink()
    reloaded, _ = load_model_and_data(student_ckpt)
    assert reloaded.hparams.coupling == "reflow" and reloaded.sampler.steps == 1


def test_reflow_refuses_teachers_it_cannot_use(tmp_path, tiny_fit):
    tiny_fit(TOY, tmp_path)
    ckpt = _only(f"{tmp_path}/**/checkpoints/*.ckpt")
    with pytest.raises(CheckpointError, match="same dataset"):
        load_teacher(ckpt, (3,))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(tmp_path / "missing.ckpt", (2,))
    from lightning_flows.models import RealNVP

    other = tmp_path / "realnvp.ckpt"
    torch.save({"lightning_flows_model_class": "lightning_flows.models.realnvp.RealNVP",
                "hyper_parameters": {"data_shape": (2,)}, "state_dict": RealNVP(data_shape=(2,)).state_dict(),
                "datamodule_hyper_parameters": {"dataset": "8gaussians"}}, other)
    with pytest.raises(CheckpointError, match="needs a FlowMatching teacher"):
        load_teacher(other, (2,))
    with pytest.raises(ValueError, match="needs teacher_ckpt"):
        tiny_fit(REFLOW, tmp_path / "student")
    # Without a Trainer, the pairs come from an explicit setup('fit').
    student = FlowMatching(data_shape=(2,), hidden=8, depth=1, coupling="reflow", teacher_ckpt=str(ckpt),
                           reflow_pairs=64, reflow_solver={"method": "euler", "steps": 2})
    with pytest.raises(RuntimeError, match="setup"):
        student.training_loss(torch.randn(8, 2))
    student.setup("fit")
    assert torch.isfinite(student.training_loss(torch.randn(8, 2)))


def test_couplings_time_sampling_and_samplers_are_selected_from_the_yaml(tmp_path, tiny_fit):
    cli = tiny_fit(OT, tmp_path, "--model.init_args.time_sampling", "logit_normal",
                   "--model.init_args.time_mean", "0.3", "--model.init_args.sigma", "0.05",
                   "--model.init_args.sampler.method", "heun", "--model.init_args.sampler.time_grid", "power",
                   "--model.init_args.sampler.steps", "3")
    model = cli.model
    assert cli.trainer.global_step == 2
    assert isinstance(cli.trainer.train_dataloader, BackgroundBatches)
    assert isinstance(model.draw_batch.coupling, MinibatchOTCoupling) and model.draw_batch.coupling.block_size == 64
    assert (model.time_sampler.kind, model.time_sampler.mean, model.sigma) == ("logit_normal", 0.3, 0.05)
    model.sample(4)
    assert model.last_sample_nfe == 5  # heun, 3 steps: 2 * 3 - 1
    # Everything comes back from the checkpoint (weights_only loading of the extended SolverConfig).
    reloaded, _ = load_model_and_data(_only(f"{tmp_path}/**/checkpoints/*.ckpt"))
    assert reloaded.hparams.coupling == "ot" and reloaded.time_sampler == model.time_sampler
    assert (reloaded.sampler.method, reloaded.sampler.time_grid, reloaded.sampler.steps) == ("heun", "power", 3)


def test_the_lecture_config_keeps_independent_coupling_inside_the_step(tmp_path, tiny_fit):
    cli = tiny_fit(TOY, tmp_path)
    assert cli.model.hparams.coupling == "independent" and cli.model.sigma == 0.0
    assert isinstance(cli.trainer.train_dataloader, InMemoryBatches)
