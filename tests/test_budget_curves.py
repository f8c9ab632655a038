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
