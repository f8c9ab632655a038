"""The benchmark: suite files checked, the table writer, skip/resume after a kill, reproducibility of a
tiny suite, and the GPU suites' dry run on a CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_flows.benchmark import runner
from lightning_flows.benchmark.store import Store
from lightning_flows.benchmark.suite import SuiteError, load_suite
from lightning_flows.benchmark.table import aggregate, dataset_table, lecture_table

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "seeds": [0],
    "models": ["realnvp", "flow_matching"],
    "datasets": {"8gaussians": {"configs": "experiments/toy2d", "steps": 6, "batch_size": 64}},
    "evaluation": {"n_samples": 60, "sample_batch_size": 30, "max_likelihood_examples": 60, "progress": False,
                   "kid_subsets": 5},
    "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                "enable_model_summary": False},
    "overrides": [{"model": "flow_matching", "reason": "a cheap sampler keeps the test fast",
                   "args": {"model.init_args.sampler": {"method": "euler", "steps": 4},
                            "model.init_args.likelihood_solver": {"method": "rk4", "steps": 4}}}],
}


def write_suite(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown key"),
    ({"evaluation": {"n_sample": 5}}, "Unknown evaluation setting"),
    ({"models": ["no_such_model"]}, "no config"),
    ({"overrides": [{"model": "realnvp", "args": {}}]}, "needs a 'reason'"),
    ({"datasets": {"8gaussians": {"configs": "experiments/toy2d", "steps": 5}}}, "needs 'batch_size'"),
])
def test_a_suite_file_with_a_mistake_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(SuiteError, match=message):
        load_suite(write_suite(tmp_path, **change), ROOT)


def test_every_committed_suite_loads_and_states_one_budget_per_dataset():
    for path in sorted((ROOT / "experiments" / "suites").glob("*.yaml")):
        suite = load_suite(path, ROOT)
        assert suite.runs, path
        for dataset in suite.datasets:
            budgets = {(r.steps, r.batch_size) for r in suite.runs if r.dataset == dataset}
            assert len(budgets) == 1, f"{path}: {dataset} mixes budgets {budgets}"


def test_quick_suite_has_all_seven_models_on_digits_and_8gaussians():
    suite = load_suite(ROOT / "experiments" / "suites" / "quick.yaml", ROOT)
    for dataset in ("digits", "8gaussians"):
        assert {r.model for r in suite.runs if r.dataset == dataset} == {
            "vae", "gan", "realnvp", "glow", "cnf", "diffusion", "flow_matching"}


def _row(model, family, dataset, seed, **numbers):
    return {"model": model, "family": family, "dataset": dataset, "seed": seed, "objective": "obj",
            "optimizer_steps": 10, "batch_size": 4, "weights": "ema", **numbers}


def test_table_writer_aggregates_seeds_and_keeps_likelihood_kinds_apart():
    rows = [_row("vae", "VAE", "digits", 1, bpd_bound=3.0, fid=14.0, fid_floor=1.0),
            _row("vae", "VAE", "digits", 0, bpd_bound=2.0, fid=10.0, fid_floor=1.0),
            _row("glow", "Glow", "digits", 0, bpd_exact=1.5, fid=20.0, fid_floor=1.0),
            _row("glow", "Glow", "digits", 1, bpd_exact=1.5, fid=22.0, fid_floor=1.0)]
    entries = aggregate(rows)
    vae = next(e for e in entries if e["model"] == "vae")
    # the sample standard deviation (n - 1), and the values in seed order whatever order the rows came in
    assert vae["bpd_bound"] == (2.5, math.sqrt(0.5)) and vae["fid"] == (12.0, math.sqrt(8.0)) and vae["seeds"] == [0, 1]
    assert vae["per_seed"]["fid"] == [10.0, 14.0]
    table = dataset_table(entries, image=True)
    header, _, vae_line, glow_line = table.strip().splitlines()
    assert "bits/dim 1 draw (exact)" in header and "bits/dim 1 draw (bound)" in header
    cells = dict(zip([h.strip() for h in header.split("|")], [c.strip() for c in vae_line.split("|")]))
    assert cells["bits/dim 1 draw (bound)"] == "2.000 / 3.000" and cells["bits/dim 1 draw (exact)"] == "-"
    assert cells["FID floor"] == "1.00"  # a property of the data: no spread
    lecture = lecture_table(entries, {"digits"})
    assert "| VAE (vae) | lecture | ELBO (variational)" in lecture
    assert lecture.count("| | measured |") == 2
    assert "2.00 / 3.00 bits/dim (bound)" in lecture and "1.50 / 1.50 bits/dim (exact)" in lecture
    assert "FID 10.0 / 14.0 (floor 1.0)" in lecture and f"seed sd {math.sqrt(8.0):.1f} FID" in lecture


def test_the_headline_likelihood_is_the_lowest_discrete_bound_with_its_label():
    """Every first number of a digits Likelihood cell bounds the same discrete NLL, and says which bound it is."""
    labels = {"likelihood_label_discrete": "discrete, IW-8 bound", "likelihood_source_discrete": "bpd_iw_exact",
              "likelihood_label_exact": "dequantised bound"}
    rows = [_row("glow", "Glow", "digits", s, bpd_exact=2.2, bpd_iw_exact=2.1, bpd_discrete=2.1, **labels)
            for s in (0, 1)]
    rows += [_row("vae", "VAE", "digits", s, bpd_bound=2.0, bpd_discrete=2.0,
                  likelihood_label_discrete="ELBO / IWAE-64 bound", likelihood_source_discrete="bpd_bound",
                  likelihood_label_bound="ELBO / IWAE-64 bound") for s in (0, 1)]
    entries = aggregate(rows)
    lecture = lecture_table(entries, {"digits"})
    assert "digits: 2.10 / 2.10 bits/dim (discrete, IW-8 bound); 2.20 / 2.20 bits/dim (dequantised bound)" in lecture
    assert "digits: 2.00 / 2.00 bits/dim (ELBO / IWAE-64 bound) |" in lecture  # the source is not repeated
    header, _, glow_line, _ = dataset_table(entries, image=True).strip().splitlines()
    cells = dict(zip([h.strip() for h in header.split("|")], [c.strip() for c in glow_line.split("|")]))
    assert cells["bits/dim (discrete NLL, upper bound)"] == "2.100 / 2.100"
    assert cells["which bound"] == "discrete, IW-8 bound"


def test_2d_quality_prints_per_seed_values_beside_the_data_noise_and_no_ratio_to_zero():
    common = dict(energy_distance_null_mean=0.0, energy_distance_null_std=0.001, num_modes=8.0,
                  ce_gap_nats_null_mean=0.0, ce_gap_nats_null_std=0.02)
    rows = [_row("realnvp", "RealNVP", "8gaussians", 0, energy_distance=0.00099, energy_distance_within_noise=True,
                 modes_hit=8.0, ce_gap_nats=0.4, ce_gap_nats_within_noise=False, **common),
            _row("realnvp", "RealNVP", "8gaussians", 1, energy_distance=-0.00111, energy_distance_within_noise=True,
                 modes_hit=7.0, ce_gap_nats=0.01, ce_gap_nats_within_noise=True, **common)]
    lecture = lecture_table(aggregate(rows), set())
    assert "ED 0.0010 / -0.0011 (real: 0.0000 ± 0.0010, within data noise)" in lecture
    assert "CE gap +0.40 / +0.01 nats (real: 0.00 ± 0.02, 1 of 2 seeds within data noise)" in lecture
    assert "8 / 7 modes hit (of 8)" in lecture and "%" not in lecture


def test_suite_runs_resumes_after_a_kill_and_reproduces_its_numbers(tmp_path, monkeypatch):
    suite = write_suite(tmp_path)
    out = tmp_path / "out"
    calls = []
    real_run_one = runner.run_one

    def crash_on_second(plan, *args, **kwargs):
        calls.append(plan.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-suite")
        return real_run_one(plan, *args, **kwargs)

    monkeypatch.setattr(runner, "run_one", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        runner.run_suite(suite, out, root=ROOT)
    finished = sorted(p.name for p in (out / "runs").iterdir() if p.is_symlink())
    assert finished == ["8gaussians__realnvp__seed0"]  # the first result was committed when it finished
    assert len(list((out / "runs").iterdir())) == 2  # its link and its attempt: the killed attempt is gone

    calls.clear()
    monkeypatch.setattr(runner, "run_one", lambda plan, *a, **k: calls.append(plan.name) or real_run_one(plan, *a, **k))
    table = runner.run_suite(suite, out, root=ROOT)
    assert calls == ["flow_matching/8gaussians/seed0"]  # only the run lost in the kill is retrained
    text = table.read_text()
    assert "## 8gaussians" in text and "| realnvp |" in text and "| flow_matching |" in text
    assert "a cheap sampler keeps the test fast" in text  # the override's reason is printed
    results = json.loads((out / "results.json").read_text())
    assert {r["model"] for r in results["runs"]} == {"realnvp", "flow_matching"}
    assert results["environment"]["packages"]["torch"] and results["environment"]["git_commit"]
    for name in ("quality_vs_cost.png", "montage.png"):
        assert (out / name).stat().st_size > 1000

    calls.clear()
    runner.run_suite(suite, out, root=ROOT)
    assert calls == []  # nothing left to do
    again = tmp_path / "again"
    runner.run_suite(suite, again, root=ROOT, force=True)
    first = {r["model"]: r for r in results["runs"]}
    second = {r["model"]: r for r in json.loads((again / "results.json").read_text())["runs"]}
    for model in first:
        for key in ("nll_exact", "nll_gap_exact", "energy_distance", "precision", "recall", "modes_hit", "global_step"):
            assert first[model][key] == second[model][key], (model, key)


def test_a_config_edited_while_its_run_trains_is_retrained(tmp_path, monkeypatch):
    """The stored key is the one of the config the run started with, so the edited config is not skipped."""
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    config = config_dir / "realnvp.yaml"
    config.write_text((ROOT / "experiments/toy2d/realnvp.yaml").read_text())
    datasets = {"8gaussians": {**TINY["datasets"]["8gaussians"], "configs": str(config_dir)}}
    suite = write_suite(tmp_path, models=["realnvp"], overrides=[], datasets=datasets)
    real_build_cli = runner.build_cli

    def edit_while_training(*args, **kwargs):
        cli = real_build_cli(*args, **kwargs)
        config.write_text(config.read_text() + "# edited while the run trained\n")
        return cli

    monkeypatch.setattr(runner, "build_cli", edit_while_training)
    out = tmp_path / "out"
    runner.run_suite(suite, out, root=ROOT)
    (plan,) = load_suite(suite, ROOT).runs
    assert Store(out).finished(plan.slug, plan.key()) is None  # the edited config has no result yet


@pytest.mark.parametrize("suite", ["mnist", "cifar10"])
def test_gpu_suites_dry_run_on_a_cpu_without_their_data(suite, capsys):
    rows = runner.dry_run(load_suite(ROOT / "experiments" / "suites" / f"{suite}.yaml", ROOT), Path("unused"), [])
    families = {"VAE", "GAN", "RealNVP", "Glow", "CNF", "Diffusion", "FlowMatching"}
    families |= {"TarFlow", "MeanFlow"} if suite == "cifar10" else set()  # beyond the lecture: on GPUs first
    assert {r["family"] for r in rows} == families
    printed = capsys.readouterr().out
    assert f"Suite '{suite}'" in printed and "inception vs train" in printed


def test_the_2d_null_is_computed_once_before_parallel_workers_start(tmp_path):
    """Each 2D dataset's null (data only) is written to the evaluator's cache by the suite's own process, so that
    the first parallel runs read it instead of each computing it at one thread."""
    cache = tmp_path / "cache"
    suite = write_suite(tmp_path, evaluation={**TINY["evaluation"], "cache_dir": str(cache), "null_draws": 6})
    plans = load_suite(suite, ROOT).runs
    runner._prepare_point_nulls(plans, load_suite(suite, ROOT))
    written = list((cache / "point_nulls").glob("8gaussians_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["draws"] == 6  # one dataset, one n: one null


def test_parallel_workers_reproduce_the_suites_own_process(tmp_path, monkeypatch):
    """--jobs 2: two worker processes, each running one plan after another at one thread, give the numbers a
    one-thread run in the suite's own process gives (nothing a worker ran before leaks into the next run)."""
    suite = write_suite(tmp_path, seeds=[0, 1])
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)  # one thread per worker on any machine
    before = runner.torch.get_num_threads()
    runner.torch.set_num_threads(1)
    try:
        runner.run_suite(suite, tmp_path / "serial", root=ROOT)
    finally:
        runner.torch.set_num_threads(before)
    runner.run_suite(suite, tmp_path / "parallel", root=ROOT, jobs=2)
    rows = {name: {(r["model"], r["seed"]): r
                   for r in json.loads((tmp_path / name / "results.json").read_text())["runs"]}
            for name in ("serial", "parallel")}
    assert len(rows["parallel"]) == 4 and rows["parallel"].keys() == rows["serial"].keys()
    for run, serial in rows["serial"].items():
        for key in ("nll_exact", "energy_distance", "precision", "recall", "mode_kl", "global_step"):
            assert rows["parallel"][run][key] == serial[key], (run, key)


def _table_after(text: str, start: str, end: str) -> list[str]:
    block = text.split(start, 1)[1].split(end, 1)[0]
    return [line for line in block.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("suite_name", ["quick", "standard", "conditional"])
def test_readme_tables_are_the_committed_snapshots(suite_name):
    """The README's quick, standard and conditional tables are what `lightning-flows benchmark` wrote into
    experiments/results/<suite>/table.md (pasted between markers); a rerun of the snapshot without the README, or
    the other way round, or a config changed since, fails here."""
    readme = (ROOT / "README.md").read_text()
    snapshot = (ROOT / "experiments" / "results" / suite_name / "table.md").read_text()
    pasted = _table_after(readme, f"<!-- {suite_name}-table:start -->", f"<!-- {suite_name}-table:end -->")
    written = _table_after(snapshot, "## The lecture's comparison, measured", "\n## ")
    assert pasted and pasted == written
    results = json.loads((ROOT / "experiments" / "results" / suite_name / "results.json").read_text())
    suite = load_suite(ROOT / "experiments" / "suites" / f"{suite_name}.yaml", ROOT)
    assert {run.key() for run in suite.runs} == {row["key"] for row in results["runs"]}, \
        f"the snapshot was not produced by the committed {suite_name} suite and configs: rerun it and copy it"


@pytest.mark.parametrize("suite_name", ["toy_nll", "one_step"])
def test_the_other_snapshots_are_the_committed_suites_and_configs(suite_name):
    """The snapshots the README quotes without pasting a table: produced by the committed suite and configs (a
    config changed since, comments included, fails here until the snapshot is rerun)."""
    results = json.loads((ROOT / "experiments" / "results" / suite_name / "results.json").read_text())
    suite = load_suite(ROOT / "experiments" / "suites" / f"{suite_name}.yaml", ROOT)
    assert {run.key() for run in suite.runs} == {row["key"] for row in results["runs"]}


# --- issue 19: bad suite files, extra arguments in the key, a failed rerun -----------------------------------

def _dataset(**changes) -> dict:
    return {"8gaussians": {**TINY["datasets"]["8gaussians"], **changes}}


@pytest.mark.parametrize("text, key, fix", [
    ("name: tiny\nseeds: [0, 1\n", "not valid YAML", "line 3"),
    ("- just\n- a list\n", "must hold a mapping", "quick.yaml"),
    (dict(seeds="foo"), "'seeds' must be a non-empty list of distinct whole numbers", "seeds: [0, 1]"),
    (dict(seeds=[]), "'seeds'", "seeds: [0, 1]"),
    (dict(datasets=[]), "'datasets' must be a mapping", "datasets: {8gaussians:"),
    (dict(datasets={}), "'datasets' must be a non-empty mapping", "datasets: {8gaussians:"),
    (dict(models="realnvp"), "'models' must be a non-empty list", "models: [vae, flow_matching]"),
    (dict(datasets=_dataset(steps="x")), "'datasets.8gaussians.steps' must be a whole number >= 1", "steps: 600"),
    (dict(datasets=_dataset(steps=0)), "'datasets.8gaussians.steps' must be a whole number >= 1", "steps: 600"),
    (dict(datasets=_dataset(steps=-5)), "got -5", "steps: 600"),
    (dict(datasets=_dataset(steps=1.5)), "optimizer steps", "steps: 600"),
    (dict(datasets=_dataset(batch_size=0)), "'datasets.8gaussians.batch_size' must be a whole number >= 1",
     "batch_size: 512"),
    (dict(trainer=["max_steps", 5]), "'trainer' must be a mapping", "trainer: {limit_val_batches: 0}"),
    (dict(evaluation={"n_samples": "many"}), "'n_samples' for 8gaussians must be int", "evaluation:"),
    (dict(models=["no_such_model"]), "no config", "fix 'datasets.8gaussians.models' (or 'models')"),
    (dict(overrides=[{"model": "realnvp", "args": {}}]), "needs a 'reason'", "overrides: [{model: realnvp, reason:"),
])
@pytest.mark.parametrize("dry", [False, True])
def test_a_malformed_suite_stops_with_one_paragraph_before_anything_is_written(tmp_path, capsys, text, key, fix,
                                                                             dry):
    """Exit status non-zero, the file, the key and the fix in one message, no traceback, no --out."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(text if isinstance(text, str) else yaml.safe_dump({**TINY, **text}))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        runner.benchmark_main(["--suite", str(suite), "--out", str(out)] + (["--dry-run"] if dry else []))
    message = str(stop.value.code)
    assert message.startswith("error: ") and str(suite) in message and key in message and fix in message, message
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    assert not out.exists()


def test_extra_fit_arguments_are_part_of_the_key_but_cosmetic_ones_are_not():
    plan = load_suite(ROOT / "experiments" / "suites" / "quick.yaml", ROOT).runs[0]
    assert plan.with_extra([]).key() == plan.key()  # the committed snapshot's keys stay valid
    changed = {plan.with_extra(extra).key() for extra in (
        ["--model.init_args.lr", "1e-9"], ["--model.init_args.lr=1e-9"], ["--trainer.precision", "bf16-mixed"],
        ["--trainer.devices", "2"], ["--trainer.accumulate_grad_batches", "2"], ["--data.num_workers", "1"])}
    assert len(changed) == 6 and plan.key() not in changed
    for cosmetic in (["--trainer.enable_progress_bar", "false"], ["--trainer.enable_model_summary=false"]):
        assert plan.with_extra(cosmetic).key() == plan.key()
    assert plan.with_extra(["--trainer.enable_progress_bar", "false", "--model.init_args.lr", "1e-9"]).key() == \
        plan.with_extra(["--model.init_args.lr", "1e-9"]).key()


def _run_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "runs").rglob("*")) if p.is_file()}


def _count_runs(monkeypatch) -> list[str]:
    calls = []
    real_run_one = runner.run_one
    monkeypatch.setattr(runner, "run_one", lambda plan, *a, **k: calls.append(plan.name) or real_run_one(plan, *a, **k))
    return calls


def test_an_extra_argument_is_another_run_which_replaces_the_result_when_it_finishes(tmp_path, monkeypatch):
    """`--model.init_args.lr 1e-9` changes the key: the run is retrained (not served the old result) and its
    result replaces the old one; the same command again reuses it."""
    suite, out = write_suite(tmp_path, models=["realnvp"], overrides=[]), tmp_path / "out"
    calls = _count_runs(monkeypatch)
    runner.run_suite(suite, out, root=ROOT)
    first = json.loads((out / "results.json").read_text())["runs"][0]
    runner.run_suite(suite, out, root=ROOT, extra=["--model.init_args.lr", "1e-9"])
    assert calls == ["realnvp/8gaussians/seed0"] * 2
    (slow,) = json.loads((out / "results.json").read_text())["runs"]
    assert slow["key"] != first["key"] and slow["nll_exact"] != first["nll_exact"]
    assert slow["extra_arguments"] == ["--model.init_args.lr", "1e-9"]
    assert "--model.init_args.lr 1e-9" in slow["command"] and "default_root_dir" not in slow["command"]
    runner.run_suite(suite, out, root=ROOT, extra=["--model.init_args.lr", "1e-9"])
    assert len(calls) == 2
    # The report of the suite without the extra argument does not mix that result in: it names it as stale.
    plain = load_suite(suite, ROOT)
    table = runner.write_suite_report(plain, plain.runs, Store(out), ROOT, "csv", [])
    assert "- has a result of other settings (config, arguments or evaluation changed since), not shown: " \
        "realnvp/8gaussians/seed0" in table.read_text()
    assert json.loads((out / "results.json").read_text())["runs"] == []


@pytest.mark.parametrize("bad_rerun", ["extra argument", "suite recipe"])
def test_a_failed_rerun_leaves_the_finished_run_byte_identical(tmp_path, monkeypatch, bad_rerun):
    """A rerun whose settings fail inside the run (a negative learning rate, only noticed once training
    starts) exits non-zero naming the run and the reason, and leaves every byte of the finished
    run as it was (no attempt directory left either); the good settings then reuse it without training."""
    suite, out = write_suite(tmp_path, models=["realnvp"], overrides=[]), tmp_path / "out"
    calls = _count_runs(monkeypatch)
    runner.run_suite(suite, out, root=ROOT)
    before = _run_files(out)
    command = ["--suite", str(suite), "--out", str(out)]
    if bad_rerun == "extra argument":
        command += ["--model.init_args.lr", "-1"]
        reason = "Invalid learning rate"
    else:
        write_suite(tmp_path, models=["realnvp"], overrides=[], recipe={"model.init_args.lr": -1.0})
        reason = "Invalid learning rate"
    with pytest.raises(SystemExit) as stop:
        runner.benchmark_main(command)
    message = str(stop.value.code)
    assert "1 of 1 runs failed" in message and f"realnvp/8gaussians/seed0: {reason}" in message, message
    assert _run_files(out) == before
    assert f"failed: {reason}" in (out / "table.md").read_text()

    write_suite(tmp_path, models=["realnvp"], overrides=[])
    runner.run_suite(suite, out, root=ROOT)
    assert len(calls) == 2 and _run_files(out) == before
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 1


def test_a_run_that_stops_short_of_its_budget_is_not_published(tmp_path):
    """A run that stops early (here --trainer.max_time expires at once; also a NonFiniteGuard stop or a signal)
    fails instead of publishing numbers of a shorter training."""
    suite = write_suite(tmp_path, models=["realnvp"], overrides=[])
    with pytest.raises(runner.RunsFailed, match="training stopped after 0 of 6 optimizer steps"):
        runner.run_suite(suite, tmp_path / "out", root=ROOT, extra=["--trainer.max_time", "00:00:00:00"])
    assert not (tmp_path / "out" / "runs" / "8gaussians__realnvp__seed0").exists()


def test_a_suite_whose_budget_is_wall_clock_time_publishes_the_runs_its_timer_ends(tmp_path):
    """experiments/suites/toy_nll.yaml trains each run for 90 s (``trainer.max_time``; its steps only a cap): the
    Timer's stop is that budget spent, so the run is published with the steps it made, not failed as short (it was,
    from the benchmark-directory change of issue 19 until this test)."""
    suite = write_suite(tmp_path, models=["realnvp"], overrides=[],
                        datasets={"8gaussians": {"configs": "experiments/toy2d", "steps": 10 ** 7, "batch_size": 64}},
                        trainer={**TINY["trainer"], "max_time": "00:00:00:02"})
    runner.run_suite(suite, tmp_path / "out", root=ROOT)
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert 0 < row["global_step"] < 10 ** 7 and row["train_seconds"] > 1.0  # the timer also counts set-up


@pytest.mark.parametrize("extra, message", [
    (["--trainer.default_root_dir", "elsewhere"], "places every run in <--out>/runs/ itself"),
    # Before the fix these trained 0 steps (exit 0, an untrained result published) or rows reported the
    # suite's batch size for runs trained at another.
    (["--trainer.max_steps", "0"], "sets every run's dataset and budget"),
    (["--trainer.max_steps=-5"], "sets every run's dataset and budget"),
    (["--data.batch_size", "7"], "change them in (a copy of) the suite file"),
    (["--trainer.max_epochs", "1"], "datasets.<name>.steps and .batch_size in"),
])
def test_the_benchmark_refuses_to_be_told_where_to_put_its_runs_or_how_long_to_train(tmp_path, capsys, extra,
                                                                                     message):
    with pytest.raises(SystemExit) as stop:
        runner.benchmark_main(["--suite", str(write_suite(tmp_path, models=["realnvp"], overrides=[])),
                               "--out", str(tmp_path / "out")] + extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and extra[0] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_dry_run_writes_nothing(tmp_path):
    runner.dry_run(load_suite(write_suite(tmp_path), ROOT), tmp_path / "out", [])
    assert not (tmp_path / "out").exists()
