"""The performance switches (fused Adam, TF32, channels_last, torch.compile, bf16 autocast) do what they say
and change no result beyond rounding; likelihoods stay float32 under autocast; logging and the progress bar
do no per-step work they do not need to."""

from __future__ import annotations

import copy
import csv
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from subprocess_runs import run as run_process
from lightning_flows.callbacks.progress import IntervalProgressBar
from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation.likelihood import split_likelihood
from lightning_flows.models import FlowMatching, RealNVP
from lightning_flows.performance import (PerformanceOptions, compile_targets, enable_fused, full_precision,
                                         inductor_unavailable)

ROOT = Path(__file__).resolve().parents[1]


def quiet_trainer(callbacks, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, max_steps=3)
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def toy_model(**kwargs) -> FlowMatching:
    torch.manual_seed(0)
    return FlowMatching(data_shape=(2,), hidden=32, depth=2, **kwargs)


def image_model(**kwargs) -> FlowMatching:
    torch.manual_seed(0)
    return FlowMatching(data_shape=(1, 8, 8), base_channels=8, channel_mults=(1, 2), **kwargs)


def fit(model, dataset: str, options: PerformanceOptions | None = None, **trainer_kwargs):
    L.seed_everything(0)
    trainer = quiet_trainer([options] if options else [], **trainer_kwargs)
    trainer.fit(model, GenerativeDataModule(dataset, batch_size=32))
    return trainer


# ---- fused Adam ----
def test_fused_adam_true_fuses_the_optimizer_and_trains_as_the_unfused_one():
    fused, plain = toy_model(), toy_model()
    trainer = fit(fused, "8gaussians", PerformanceOptions(fused_adam="true"))
    fit(plain, "8gaussians", PerformanceOptions(fused_adam="false"))
    assert all(group["fused"] for group in trainer.optimizers[0].param_groups)
    moved = [not torch.equal(a, b) for a, b in zip(fused.parameters(), toy_model().parameters())]
    assert any(moved)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_adam_auto_stays_off_on_the_cpu():
    trainer = fit(toy_model(), "8gaussians", PerformanceOptions())
    assert not any(group["fused"] for group in trainer.optimizers[0].param_groups)


def test_enable_fused_on_a_resumed_optimizer_continues_like_the_unfused_one():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    fused, plain = torch.optim.Adam(weights, lr=0.1), torch.optim.Adam(twins, lr=0.1)
    for step in range(4):
        grads = [torch.randn(5) for _ in weights]
        for p, q, g in zip(weights, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:  # the state already holds step counters, as after a resume
            assert enable_fused(fused)
            assert fused.param_groups[0]["fused"] and fused.state[weights[0]]["step"].dtype == torch.float32
        fused.step()
        plain.step()
    for p, q in zip(weights, twins):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_enable_fused_refuses_optimizers_without_a_fused_kernel():
    p = torch.nn.Parameter(torch.randn(3))
    assert not enable_fused(torch.optim.LBFGS([p]))  # no "fused" flag at all
    assert not enable_fused(torch.optim.Adam([p], foreach=True))  # the user asked for foreach


# ---- channels_last ----
def test_channels_last_converts_conv_weights_and_changes_no_output():
    reference = image_model().eval()
    model = copy.deepcopy(reference)
    trainer = quiet_trainer([PerformanceOptions(channels_last=True)])
    PerformanceOptions(channels_last=True).setup(trainer, model, "fit")
    conv = model.velocity.down_blocks[0].conv1.weight  # (8, 8, 3, 3): the two layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    torch.testing.assert_close(model(x, t), reference(x, t), atol=1e-5, rtol=1e-5)
    fresh = image_model()
    fresh.load_state_dict(model.state_dict())  # checkpoints stay loadable by a plain model
    torch.testing.assert_close(fresh.eval()(x, t), reference(x, t), atol=1e-5, rtol=1e-5)


def test_channels_last_leaves_vector_models_alone_and_trains_images():
    toy = toy_model()
    PerformanceOptions(channels_last=True).setup(quiet_trainer([]), toy, "fit")
    trainer = fit(image_model(), "digits", PerformanceOptions(channels_last=True), max_steps=2)
    assert trainer.global_step == 2


# ---- torch.compile ----
def test_compile_targets_are_the_outermost_backbones():
    assert [name for name, _ in compile_targets(toy_model())] == ["velocity"]
    names = [name for name, _ in compile_targets(RealNVP(data_shape=(1, 4, 4), levels=1, steps=2, hidden=8))]
    assert names and all(name.endswith("conditioner") for name in names)
    assert [name for name, _ in compile_targets(toy_model(), ["velocity.mlp"])] == ["velocity.mlp"]
    with pytest.raises(ValueError, match="does not have"):
        compile_targets(toy_model(), ["generator"])


def test_compile_keeps_parameter_names_and_outputs():
    model, reference = toy_model(), toy_model()
    options = PerformanceOptions(compile=True, compile_backend="eager")  # traces with dynamo, no code generation
    trainer = fit(model, "8gaussians", options, max_steps=2)
    assert options.compiled == ["velocity"] and trainer.global_step == 2
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict())
    x, t = torch.randn(8, 2), torch.rand(8)
    torch.testing.assert_close(model(x, t), reference(x, t))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_inductor_compiled_backbone_matches_eager():
    reason = inductor_unavailable("cpu")
    if reason:
        pytest.skip(reason)
    model, reference = toy_model(), toy_model()
    options = PerformanceOptions(compile=True)
    options.setup(quiet_trainer([]), model, "fit")
    x, t = torch.randn(8, 2), torch.rand(8)
    torch.testing.assert_close(model(x, t), reference(x, t), atol=1e-5, rtol=1e-5)
    model(x, t).pow(2).mean().backward()
    reference(x, t).pow(2).mean().backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


# ---- precision ----
def test_tf32_is_only_switched_on_for_cuda():
    before = torch.get_float32_matmul_precision()
    PerformanceOptions(tf32=True).setup(quiet_trainer([]), toy_model(), "fit")
    assert torch.get_float32_matmul_precision() == before


def test_full_precision_turns_autocast_off_and_restores_it():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with full_precision("cpu"):
            assert (a @ b).dtype == torch.float32
            assert torch.get_float32_matmul_precision() == "highest"
        assert (a @ b).dtype == torch.bfloat16


def test_likelihoods_are_float32_inside_a_bf16_autocast_region():
    fm = toy_model(likelihood_solver={"method": "rk4", "steps": 4})
    flow = RealNVP(data_shape=(2,), steps=2, hidden=16)
    dm = GenerativeDataModule("8gaussians")
    data = dm.split("test")[:64]
    for model in (fm, flow):
        reference = split_likelihood(model, data, 32, seed=0, rank=0, world=1).nll
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert split_likelihood(model, data, 32, seed=0, rank=0, world=1).nll == reference
    with torch.no_grad():
        exact = fm.log_prob(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(fm.log_prob(data), exact, atol=0, rtol=0)  # the ODE solve itself


@pytest.mark.parametrize("config", ["experiments/toy2d/flow_matching.yaml", "experiments/digits/glow.yaml"])
def test_bf16_mixed_training_runs_from_the_cli(config, tiny_fit, tmp_path):
    cli = tiny_fit(config, tmp_path, "--trainer.precision", "bf16-mixed")
    assert cli.trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


# ---- logging cadence and the progress bar ----
def test_training_loss_is_logged_on_the_logger_steps_only(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_flows.callbacks import NonFiniteGuard

    trainer = quiet_trainer([NonFiniteGuard()], logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2,
                            max_steps=6)
    L.seed_everything(0)
    trainer.fit(toy_model(), GenerativeDataModule("8gaussians", batch_size=32))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # Lightning writes every 2nd step: no row is lost
    assert all(r["train/skipped_steps"] == "0.0" for r in rows)


@pytest.mark.parametrize("make", [toy_model, lambda: RealNVP(data_shape=(2,), steps=2, hidden=16)],
                         ids=["flow_matching", "realnvp"])
def test_training_step_logs_are_recorded_only_when_the_logger_writes_them(make, monkeypatch):
    recorded = []
    original = L.LightningModule.log
    monkeypatch.setattr(L.LightningModule, "log", lambda self, name, *a, **k: (recorded.append(
        (self._current_fx_name, name, self.trainer.global_step)), original(self, name, *a, **k))[1])
    trainer = quiet_trainer([], log_every_n_steps=3, max_steps=6)
    trainer.fit(make(), GenerativeDataModule("8gaussians", batch_size=32))
    steps = [step for fx, name, step in recorded if fx == "training_step" and name == "train/loss"]
    assert steps == [0, 2, 5]  # the first step (progress bar), then the steps Lightning writes


class CountMetricReads(L.Callback):
    def __init__(self, bar: IntervalProgressBar):
        self.reads = 0
        original = bar.get_metrics

        def counting(*args, **kwargs):
            self.reads += 1
            return original(*args, **kwargs)

        bar.get_metrics = counting


@pytest.mark.parametrize("interval, reads", [(0.0, 6), (3600.0, 2)])
def test_interval_progress_bar_reads_metrics_only_when_it_redraws(interval, reads):
    bar = IntervalProgressBar(min_interval=interval)
    counter = CountMetricReads(bar)
    trainer = quiet_trainer([bar, counter], enable_progress_bar=True, max_steps=6, limit_train_batches=6)
    trainer.fit(toy_model(), GenerativeDataModule("8gaussians", batch_size=32))
    # Per training batch (6), or only the first and the epoch's last; the epoch end reads once more.
    assert counter.reads == reads + 1
    assert bar.train_progress_bar.n == 6


def test_cli_runs_have_the_interval_bar_and_the_performance_switches(tiny_fit, tmp_path):
    cli = tiny_fit("experiments/toy2d/flow_matching.yaml", tmp_path, "--trainer.enable_progress_bar", "true",
                   "--performance.fused_adam", "true")
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert kinds.count("IntervalProgressBar") == 1 and "PerformanceOptions" in kinds
    assert all(group["fused"] for group in cli.trainer.optimizers[0].param_groups)


# ---- DDP ----
@pytest.mark.slow  # a feature under 2 DDP ranks, in `make test-slow` (keeps `make test` under 10 min)
@pytest.mark.timeout(300)
def test_switches_under_two_cpu_ranks_keep_replicas_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, str(Path(__file__).with_name("perf_ddp_probe.py")), str(tmp_path), "3"],
                         timeout=280, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert r["fused"] and r["channels_last"] and r["compiled"] == ["velocity"] and r["global_step"] == 3
        assert r["skipped"] == 1  # rank 1's NaN batch: both ranks skipped the same step
    for name, weight in r0["state_dict"].items():
        assert torch.equal(weight, r1["state_dict"][name]), name
        assert torch.isfinite(weight).all(), name
