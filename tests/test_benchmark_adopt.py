"""`lightning-flows benchmark --adopt <report>/results.json`: an earlier report's unchanged runs become finished runs
of a new directory, so that one retrained model is reported beside them; a changed run is never adopted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lightning_flows.benchmark import runner
from lightning_flows.benchmark.adopt import adopt_results
from lightning_flows.benchmark.store import Store
from lightning_flows.benchmark.suite import SuiteError, load_suite
from test_benchmark import TINY, _count_runs  # the tiny two-model toy suite; a counter of trained runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def suite(tmp_path) -> Path:
    """The tiny suite over a copy of the toy configs, which the test may edit."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for model in TINY["models"]:
        shutil.copy(ROOT / "experiments" / "toy2d" / f"{model}.yaml", configs / f"{model}.yaml")
    path = tmp_path / "suite.yaml"
    datasets = {"8gaussians": {"configs": str(configs), "steps": 6, "batch_size": 64}}
    path.write_text(yaml.safe_dump({**TINY, "datasets": datasets}))
    return path


def test_adopting_a_report_retrains_only_the_changed_model_and_reports_both(suite, tmp_path, monkeypatch):
    first = tmp_path / "first"
    runner.run_suite(suite, first, root=ROOT)
    snapshot = tmp_path / "snapshot"  # what a commit keeps of a report: no run directories
    shutil.copytree(first, snapshot, ignore=shutil.ignore_patterns("runs", "locks"))
    before = {r["model"]: r for r in json.loads((snapshot / "results.json").read_text())["runs"]}
    config = suite.parent / "configs" / "flow_matching.yaml"
    config.write_text(config.read_text() + "# a new recipe\n")  # a new key for flow matching only

    calls = _count_runs(monkeypatch)
    out = tmp_path / "out"
    table = runner.run_suite(suite, out, root=ROOT, adopt=snapshot / "results.json")
    assert calls == ["flow_matching/8gaussians/seed0"]  # realnvp adopted, flow matching trained
    after = {r["model"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(after) == {"realnvp", "flow_matching"}
    adopted = after["realnvp"]
    assert adopted["adopted_from"]["file"] == str(snapshot / "results.json")
    assert adopted["adopted_from"]["attempt"] == before["realnvp"]["attempt"]
    assert {k: v for k, v in adopted.items() if k != "adopted_from"} == before["realnvp"]
    assert after["flow_matching"]["key"] != before["flow_matching"]["key"] and "adopted_from" not in after[
        "flow_matching"]
    text = table.read_text()
    assert "1 of 2 runs (realnvp) were not retrained for this report" in text and "| realnvp |" in text
    # No montage: the adopted run has its picture but not its samples, and a montage without it would look whole.
    assert (first / "montage.png").is_file() and not (out / "montage.png").exists() and "montage.png" not in text
    assert (out / "samples" / "8gaussians__realnvp__seed0.png").read_bytes() == \
        (snapshot / "samples" / "8gaussians__realnvp__seed0.png").read_bytes()

    # Adopting again changes nothing: the finished runs stay, nothing trains.
    calls.clear()
    plans = load_suite(suite, ROOT).runs
    adoption = adopt_results(Store(out), plans, snapshot / "results.json")
    assert adoption.adopted == [] and set(adoption.not_adopted.values()) == {"already finished here"}
    runner.run_suite(suite, out, root=ROOT, adopt=snapshot / "results.json")
    assert calls == []


def test_a_row_of_other_settings_or_another_suite_is_not_adopted(suite, tmp_path):
    report = tmp_path / "results.json"
    plans = load_suite(suite, ROOT).runs
    rows = [{"dataset": p.dataset, "model": p.model, "seed": p.seed, "key": "0" * 16, "nll_exact": 1.0} for p in plans]
    report.write_text(json.dumps({"runs": rows[:1], "environment": {"git_commit": "abc"}}))
    adoption = adopt_results(Store(tmp_path / "out"), plans, report)
    assert adoption.adopted == []
    assert adoption.not_adopted == {plans[0].slug: "of other settings (config, arguments or evaluation changed since)",
                                    plans[1].slug: "not in the file"}
    assert not (tmp_path / "out" / "runs").exists() or not any((tmp_path / "out" / "runs").iterdir())


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not a readable JSON report"),
    ('{"rows": []}', "not a benchmark report"),
])
def test_a_missing_or_foreign_file_is_a_clear_error(suite, tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SuiteError, match=message):
        adopt_results(Store(tmp_path / "out"), load_suite(suite, ROOT).runs, path)
    with pytest.raises(SystemExit, match=message):  # the CLI says it in one line, before anything trains
        runner.benchmark_main(["--suite", str(suite), "--out", str(tmp_path / "cli"), "--adopt", str(path)])


def test_an_adopted_row_shows_the_current_null_and_a_changed_null_draw_count_keeps_the_keys(suite, tmp_path,
                                                                                             monkeypatch):
    """The real-vs-real null is data only: a snapshot evaluated with another null_draws (or an older null) is adopted
    (its keys hold), and the report shows each adopted row with the null this evaluator computes, its metrics as
    they were."""
    first = tmp_path / "first"
    runner.run_suite(suite, first, root=ROOT)
    report = json.loads((first / "results.json").read_text())
    current = {r["model"]: r for r in report["runs"]}
    for row in report["runs"]:  # what an older evaluator wrote: 20 draws, another std
        row.update(null_draws=20, energy_distance_null_std=1e-9, energy_distance_within_noise=False)
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(report))
    spec = yaml.safe_load(suite.read_text())
    suite.write_text(yaml.safe_dump({**spec, "evaluation": {**spec["evaluation"], "null_draws": 37}}))
    assert {p.key() for p in load_suite(suite, ROOT).runs} == {r["key"] for r in report["runs"]}

    calls = _count_runs(monkeypatch)
    out = tmp_path / "out"
    runner.run_suite(suite, out, root=ROOT, adopt=stale)
    assert calls == []  # every run adopted
    for row in json.loads((out / "results.json").read_text())["runs"]:
        before = current[row["model"]]
        assert row["null_draws"] == 37 and row["energy_distance"] == before["energy_distance"]
        assert row["energy_distance_null_std"] not in (1e-9, before["energy_distance_null_std"])
        mean, std = row["energy_distance_null_mean"], row["energy_distance_null_std"]
        assert row["energy_distance_within_noise"] == (abs(row["energy_distance"] - mean) <= 2 * std)
