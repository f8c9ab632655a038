"""Quality against training compute (issue 20, item 11): evaluation schedules in suite files, their run keys, and
the standard suite's dry run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_flows.benchmark import runner
from lightning_flows.benchmark.suite import SuiteError, load_suite

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


def test_the_standard_suite_dry_runs_all_seven_families_with_its_schedule(capsys):
    suite = load_suite(ROOT / "experiments" / "suites" / "standard.yaml", ROOT)
    assert {p.steps for p in suite.runs} == {3000} and suite.seeds == [0, 1, 2]
    assert all(p.curve_steps() == ([300, 900], []) for p in suite.runs)
    rows = runner.dry_run(suite, Path("unused"), [])
    assert {r["family"] for r in rows} == {"VAE", "GAN", "RealNVP", "Glow", "CNF", "Diffusion", "FlowMatching"}
    assert "Suite 'standard'" in capsys.readouterr().out


def test_a_schedule_changes_no_weight_and_its_last_point_is_the_final_evaluation(tmp_path):
    """GAN (EMA, two optimizer steps a batch) and RealNVP: the same final weights and EMA with and without the
    evaluations during training; the curve's steps, training seconds and last point are the run's own."""
    evaluation = {"n_samples": 60, "sample_batch_size": 30, "max_likelihood_examples": 60, "progress": False,
                  "kid_subsets": 5}
    trainer = {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False}
    common = dict(models=["gan", "realnvp"], evaluation=evaluation, trainer=trainer)
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
        assert [(p["step"], p["evaluation"]) for p in curve] == [(2, "cheap"), (4, "full"), (8, "full")]
        assert curve[-1]["energy_distance"] == row["energy_distance"]
        assert curve[-1]["train_seconds"] == row["train_seconds"]
        assert all(p["train_seconds"] < q["train_seconds"] for p, q in zip(curve, curve[1:]))
        assert {p["weights"] for p in curve} == {"ema" if model == "gan" else "training"}
