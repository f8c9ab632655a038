"""Quality against training compute (issue 20, item 11): evaluation schedules in suite files, their run keys, and
the standard suite's dry run."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_flows.benchmark import runner
from lightning_flows.benchmark.suite import SuiteError, load_suite
from lightning_flows.callbacks import EMACallback, EvaluationSchedule, TrainingTimer
from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import Evaluator
from lightning_flows.models import FlowMatching

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "seeds": [0], "models": ["realnvp"],
        "datasets": {"8gaussians": {"configs": "experiments/toy2d", "steps": 8, "batch_size": 64}}}


def _suite(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.mark.parametrize("schedule, message", [
    ([0.3, 0.1], "sorted"), ([0.1, 0.1], "sorted"), ([0.0, 1.0], "(0, 1]"), ([0.5, 1.5], "(0, 1]"),
    ("often", "list of fractions"), ([], "list of fractions"), ([True], "list of fractions"),
])
def test_a_bad_schedule_is_a_clear_error(tmp_path, schedule, message):
    with pytest.raises(SuiteError, match=r"evaluate_at") as err:
        load_suite(_suite(tmp_path, evaluate_at=schedule), ROOT)
    assert message in str(err.value)


def test_the_schedule_is_part_of_the_key_and_its_absence_keeps_the_old_key(tmp_path):
    (plain,) = load_suite(_suite(tmp_path), ROOT).runs
    (scheduled,) = load_suite(_suite(tmp_path, evaluate_at=[0.5, 1.0]), ROOT).runs
    (other,) = load_suite(_suite(tmp_path, evaluate_at=[0.25, 1.0]), ROOT).runs
    (cheap,) = load_suite(_suite(tmp_path, evaluate_at=[0.5, 1.0], cheap_evaluate_at=[0.25]), ROOT).runs
    assert len({plain.key(), scheduled.key(), other.key(), cheap.key()}) == 4
    assert scheduled.curve_steps() == ([4], []) and cheap.curve_steps() == ([4], [2])
    datasets = {"8gaussians": {**TINY["datasets"]["8gaussians"], "evaluate_at": [0.25, 1.0]}}
    (per_dataset,) = load_suite(_suite(tmp_path, datasets=datasets, evaluate_at=[0.5, 1.0]), ROOT).runs
    assert per_dataset.key() == other.key()  # the dataset's schedule wins over the suite's
    assert "EvaluationSchedule" not in " ".join(runner.run_arguments(plain, None, tmp_path, "csv"))


def test_the_standard_suite_dry_runs_the_seven_families_nsf_and_the_two_beyond_with_its_schedule(capsys):
    suite = load_suite(ROOT / "experiments" / "suites" / "standard.yaml", ROOT)
    assert {p.steps for p in suite.runs} == {3000} and suite.seeds == [0, 1, 2]
    assert all(p.curve_steps() == ([300, 900], []) for p in suite.runs)
    rows = runner.dry_run(suite, Path("unused"), [])
    assert {r["family"] for r in rows} == {"VAE", "GAN", "RealNVP", "Glow", "NSF", "CNF", "Diffusion",
                                           "FlowMatching", "TarFlow", "MeanFlow"}
    assert "Suite 'standard'" in capsys.readouterr().out


def test_a_schedule_changes_no_weight_and_its_last_point_is_the_final_evaluation(tmp_path):
    """GAN (EMA, two optimizer steps a batch) and RealNVP: the same final weights and EMA with and without the
    evaluations during training; the curve's steps, training seconds and last point are the run's own."""
    evaluation = {"n_samples": 60, "sample_batch_size": 30, "max_likelihood_examples": 60, "progress": False,
                  "kid_subsets": 5, "null_draws": 2}
    trainer = {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False}
    datasets = {"8gaussians": {**TINY["datasets"]["8gaussians"], "steps": 4}}  # evaluated at 1, 2 and 4
    common = dict(models=["gan", "realnvp"], datasets=datasets, evaluation=evaluation, trainer=trainer)
    runner.run_suite(_suite(tmp_path / "a", **common) if (tmp_path / "a").mkdir() is None else None,
                     tmp_path / "plain", root=ROOT)
    runner.run_suite(_suite(tmp_path / "b", evaluate_at=[0.5, 1.0], cheap_evaluate_at=[0.25], **common)
                     if (tmp_path / "b").mkdir() is None else None, tmp_path / "curve", root=ROOT)
    import json

    import torch
    for model in ("gan", "realnvp"):
        slug = f"8gaussians__{model}__seed0"
        a, b = (torch.load(tmp_path / out / "runs" / slug / "checkpoints" / "last.ckpt", weights_only=False)
                for out in ("plain", "curve"))
        for part in ("state_dict", "ema_state_dict"):
            assert (part in a) == (part in b)
            for name, value in a.get(part, {}).items():
                assert torch.equal(value, b[part][name]), (model, part, name)
        row = json.loads((tmp_path / "curve" / "runs" / slug / "result.json").read_text())
        row = row.get("row", row)
        curve = row["curve"]
        assert [(p["step"], p["evaluation"]) for p in curve] == [(1, "cheap"), (2, "full"), (4, "full")]
        assert curve[-1]["energy_distance"] == row["energy_distance"]
        assert curve[-1]["train_seconds"] == row["train_seconds"]
        assert all(p["train_seconds"] < q["train_seconds"] for p, q in zip(curve, curve[1:]))
        assert {p["weights"] for p in curve} == {"ema" if model == "gan" else "training"}


# Not numbers of the model: the clocks, and the threads of the process that measured.
NOT_COMPARED = ("ms_per_sample", "torch_threads")


def _measured(point: dict) -> dict:
    return {k: v for k, v in point.items()
            if k not in NOT_COMPARED and not k.endswith("_seconds") and k not in ("step", "evaluation", "weights")}


@pytest.mark.timeout(420)
def test_a_curve_under_ddp_is_the_single_process_evaluation_of_the_same_weights(tmp_path):
    """2 gloo CPU ranks (`lightning-flows benchmark ... --trainer.devices 2 --trainer.strategy ddp`), GAN (EMA, two
    optimizer steps a batch) and RealNVP (exact likelihood): every point of each curve, the cheap one at 25%, the
    full one at 50% and the final evaluation, equals the evaluation in this one process of the weights checkpointed
    at that step (the EMA weights when kept), and both ranks computed the same points."""
    import json

    from subprocess_runs import cli, python_env
    from subprocess_runs import run as run_process

    from lightning_flows.callbacks.evaluation import cheap_spec, curve_point
    from lightning_flows.checkpoints import load_model_and_data
    from lightning_flows.evaluation import Evaluator

    evaluation = {"n_samples": 60, "sample_batch_size": 30, "max_likelihood_examples": 60, "progress": False,
                  "null_draws": 2, "sampling_std_draws": 1}
    trainer = {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
               "enable_model_summary": False}
    datasets = {"8gaussians": {**TINY["datasets"]["8gaussians"], "steps": 4}}  # evaluated at 1, 2 and 4
    suite = _suite(tmp_path, models=["gan", "realnvp"], datasets=datasets, evaluation=evaluation, trainer=trainer,
                   evaluate_at=[0.5, 1.0], cheap_evaluate_at=[0.25])
    probe, out = tmp_path / "probe", tmp_path / "out"
    recorder = json.dumps({"class_path": "curve_probe.RecordCurve", "init_args": {"directory": str(probe)}})
    done = run_process(cli("benchmark", "--suite", str(suite), "--out", str(out), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp", f"--trainer.callbacks+={recorder}"),
                       timeout=360, env=python_env(), cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    plans = {p.model: p for p in load_suite(suite, ROOT).runs}
    for model, family in (("gan", "GAN"), ("realnvp", "RealNVP")):
        run_dir = out / "runs" / f"8gaussians__{model}__seed0"
        row = json.loads((run_dir / "result.json").read_text())
        row = row.get("row", row)
        curve = row["curve"]
        assert row["devices"] == 2
        assert [(p["step"], p["evaluation"]) for p in curve] == [(1, "cheap"), (2, "full"), (4, "full")]
        assert {p["weights"] for p in curve} == {"ema" if model == "gan" else "training"}
        assert len({p["energy_distance"] for p in curve}) == 3  # three different weights were evaluated
        # Every rank evaluated at the same steps and holds the same (all-gathered) numbers as rank zero's curve.
        ranks = [json.loads((probe / f"{family}_rank{r}.json").read_text()) for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2]
        for points in (r["points"] for r in ranks):
            assert [_measured(p) for p in points] == [_measured(p) for p in curve[:-1]], model
        checkpoints = [probe / f"{family}_step1.ckpt", probe / f"{family}_step2.ckpt",
                       run_dir / "checkpoints" / "last.ckpt"]
        for point, checkpoint in zip(curve, checkpoints):
            net, datamodule = load_model_and_data(checkpoint)
            spec = plans[model].evaluation
            spec = cheap_spec(spec, image=False) if point["evaluation"] == "cheap" else spec
            single = curve_point(Evaluator(spec).evaluate(net, datamodule, run_seed=0), point["step"], None)
            single = _measured(single)
            assert set(single) == set(_measured(point)), (model, point["step"])
            for key, value in _measured(point).items():
                assert value == pytest.approx(single[key], rel=1e-6, abs=1e-12), (model, point["step"], key)


def _tiny_fit(callbacks: list, max_steps: int = 4) -> L.Trainer:
    """A tiny flow-matching fit on 8 Gaussians with ``callbacks`` (no validation, no checkpoint); the trainer is
    kept in ``_tiny_fit.trainer`` also when the fit raises."""
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    _tiny_fit.trainer = trainer
    trainer.fit(FlowMatching(data_shape=(2,), hidden=8, depth=1),
                datamodule=GenerativeDataModule("8gaussians", batch_size=64))
    return trainer


@pytest.mark.parametrize("late", [["EMACallback"], ["TrainingTimer"], ["EMACallback", "TrainingTimer"]])
def test_a_schedule_before_the_ema_or_the_clock_refuses_to_start(late):
    """Before EMACallback it would evaluate the average of the previous step, before TrainingTimer its evaluations
    would count as training: the fit stops before its first step, naming the callbacks to move."""
    made = {"EMACallback": lambda: EMACallback(decay=0.9), "TrainingTimer": TrainingTimer}
    early = [made[name]() for name in made if name not in late]
    with pytest.raises(ValueError, match=r"EvaluationSchedule must come after " + ", ".join(late) + " in the "):
        _tiny_fit([*early, EvaluationSchedule(steps=[1]), *(made[name]() for name in late)])
    assert _tiny_fit.trainer.global_step == 0
    spec = {"n_samples": 20, "likelihood": False, "timing": False, "null_draws": 2, "progress": False}
    schedule = EvaluationSchedule(steps=[1], spec=spec)
    trainer = _tiny_fit([EMACallback(decay=0.9), TrainingTimer(), schedule], max_steps=1)
    assert trainer.global_step == 1 and [p["weights"] for p in schedule.points] == ["ema"]


def test_evaluations_during_training_are_not_training_seconds(monkeypatch):
    """Each evaluation of the schedule takes 1 s here: the fit's wall time holds both, its training clock (the
    row's train_seconds) and every point's train_seconds neither."""
    seconds = 1.0
    evaluated: list[float] = []

    def slow_evaluation(self, model, datamodule, weights="training", **kwargs):
        time.sleep(seconds)
        evaluated.append(seconds)
        return {"weights": weights, "energy_distance": 0.0}

    monkeypatch.setattr(Evaluator, "evaluate", slow_evaluation)
    timer, schedule = TrainingTimer(), EvaluationSchedule(steps=[2], cheap_steps=[1], spec={"progress": False})
    start = time.perf_counter()
    trainer = _tiny_fit([timer, schedule], max_steps=3)
    wall = time.perf_counter() - start
    assert trainer.global_step == 3 and len(evaluated) == 2 and timer.batches == 3
    assert [(p["step"], p["evaluation"]) for p in schedule.points] == [(1, "cheap"), (2, "full")]
    assert wall >= timer.seconds + sum(evaluated)  # the evaluations happened during the fit, outside the clock
    # Three steps of a 2D flow with 8 hidden units take milliseconds, far from the 1 s of one evaluation.
    assert 0 < schedule.points[0]["train_seconds"] < schedule.points[1]["train_seconds"] < timer.seconds < seconds
