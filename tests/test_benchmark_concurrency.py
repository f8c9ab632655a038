"""Several `lightning-flows benchmark` processes on one --out (issue 19): at once with disjoint and overlapping
--only sets, killed mid-run, and under DDP. Each run is trained exactly once, the report afterwards lists
every run of the suite, and a killed attempt leaves nothing a later process trips over.

Real processes (the locks are per process). Each test takes seconds of tiny training on 8 Gaussians; most of
its time is the processes' imports. The kill and DDP tests are marked slow (`make test-slow`)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from subprocess_runs import ROOT, cli, python_env

from lightning_flows.benchmark.store import Holder, Store

SUITE = {
    "name": "tiny",
    "seeds": [0, 1],
    "models": ["realnvp", "flow_matching"],
    "datasets": {"8gaussians": {"configs": "experiments/toy2d", "steps": 4, "batch_size": 32}},
    "evaluation": {"n_samples": 40, "sample_batch_size": 40, "max_likelihood_examples": 40, "progress": False,
                   "kid_subsets": 5, "timing": False},
    "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                "enable_model_summary": False},
    "overrides": [{"model": "flow_matching", "reason": "a cheap sampler keeps the test fast",
                   "args": {"model.init_args.sampler": {"method": "euler", "steps": 2},
                            "model.init_args.likelihood_solver": {"method": "euler", "steps": 2}}}],
}
RUNS = {f"{model}/8gaussians/seed{seed}" for model in SUITE["models"] for seed in SUITE["seeds"]}
TIMEOUT = 600  # a contended 2-core machine; a tiny run takes seconds


def _suite(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**SUITE, **changes}))
    return path


def _start(suite: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(cli("benchmark", "--suite", str(suite), "--out", str(out), *args), cwd=ROOT,
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, output[-3000:]
    return output


def _trained(*outputs: str) -> Counter:
    """How often each run was trained, from the lines the processes print when they start training one."""
    return Counter(m for output in outputs for m in re.findall(r"\] (\S+/\S+/seed\d+): training ", output))


def _reported(out: Path) -> set[str]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {f"{r['model']}/{r['dataset']}/seed{r['seed']}" for r in runs}


def _assert_clean(out: Path) -> None:
    """Every run committed once: runs/ holds one link and its one attempt per run, nothing else."""
    entries = sorted(p.name for p in (out / "runs").iterdir())
    links = [name for name in entries if (out / "runs" / name).is_symlink()]
    assert len(links) == len(RUNS) and len(entries) == 2 * len(RUNS), entries
    for name in links:
        assert (out / "runs" / name / "result.json").is_file()


@pytest.mark.parametrize("first, second", [
    (["--only", "realnvp"], ["--only", "flow_matching"]),  # disjoint
    ([], ["--only", "realnvp"]),  # overlapping: the second wants runs the first holds or has finished
])
def test_two_processes_on_one_out_train_each_run_once_and_report_all(tmp_path, first, second):
    suite, out = _suite(tmp_path), tmp_path / "out"
    a, b = _start(suite, out, *first), _start(suite, out, *second)
    outputs = _finish(a), _finish(b)
    trained = _trained(*outputs)
    assert set(trained) == RUNS and set(trained.values()) == {1}, trained  # nobody trained a run twice
    assert _reported(out) == RUNS  # the last report lists every run, whichever process trained it
    table = (out / "table.md").read_text()
    assert "| realnvp |" in table and "| flow_matching |" in table and "Partial" not in table
    _assert_clean(out)


@pytest.mark.slow  # ~15 s on a quiet 2-core machine; the commit's kill safety is also tested without torch
def test_a_killed_process_loses_only_its_run_in_flight(tmp_path):
    """SIGKILL while the second run trains: the first run's files stay byte-identical, the lock dies with the
    process, and the next process retrains only what was lost and deletes the killed attempt."""
    suite, out = _suite(tmp_path), tmp_path / "out"
    process = _start(suite, out, "--only", "realnvp")
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "[2/2]" in line and ": training " in line:
            break
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=TIMEOUT)
    store = Store(out)
    first = store.link("8gaussians__realnvp__seed0").resolve()
    files = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert (first / "result.json").is_file()
    assert len(list((out / "runs").glob("8gaussians__realnvp__seed1.attempt-*"))) == 1  # the killed attempt

    rerun = _finish(_start(suite, out))
    assert _trained(rerun) == Counter(RUNS - {"realnvp/8gaussians/seed0"})
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == files
    assert _reported(out) == RUNS
    _assert_clean(out)


@pytest.mark.slow  # two DDP ranks training three runs: ~20 s on a quiet 2-core machine
def test_ddp_ranks_follow_rank_zero_past_a_run_another_process_holds(tmp_path):
    """--trainer.devices 2: rank zero skips the run whose lock this test holds, and the rank Lightning starts
    (which runs the benchmark command again) joins exactly the runs rank zero trains."""
    suite, out = _suite(tmp_path, models=["realnvp"], seeds=[0, 1, 2]), tmp_path / "out"
    claim = Store(out).claim("8gaussians__realnvp__seed1")
    assert not isinstance(claim, Holder)
    with claim:
        output = _finish(_start(suite, out, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                "--trainer.strategy", "ddp"))
    assert _trained(output) == Counter({"realnvp/8gaussians/seed0": 1, "realnvp/8gaussians/seed2": 1})
    assert re.search(r"realnvp/8gaussians/seed1: skipped, process \d+ on \S+ \(since [\d:]+\) is training it",
                     output), output[-3000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["seed"], r["devices"]) for r in runs} == {(0, 2), (2, 2)}
    assert not list((out / "locks").glob("ranks-*"))  # the announcements are gone with the suite
    table = (out / "table.md").read_text()
    assert "realnvp/8gaussians/seed1" in table and "being trained by process" in table


@pytest.mark.slow  # a single-process run, then two DDP ranks training one: ~25 s on a quiet 2-core machine
def test_ddp_ranks_train_the_runs_rank_zero_did_not_adopt(tmp_path):
    """--adopt under --trainer.devices 2: rank zero adopts the earlier report's run before the session starts, the
    rank Lightning starts (which runs the benchmark command again, --adopt included) adopts nothing itself and joins
    exactly the run rank zero trains, and the report holds the adopted row beside the one both ranks trained."""
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")  # in the run keys
    first_suite = _suite(tmp_path, models=["realnvp"], seeds=[0])
    first = tmp_path / "first"
    _finish(_start(first_suite, first, *ddp))
    suite, out = _suite(tmp_path, models=["realnvp"], seeds=[0, 1]), tmp_path / "out"
    output = _finish(_start(suite, out, "--adopt", str(first / "results.json"), *ddp))
    assert _trained(output) == Counter({"realnvp/8gaussians/seed1": 1})
    assert len(re.findall(r"adopted 1 finished run", output)) == 1, output[-3000:]  # rank zero only
    runs = {r["seed"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    earlier = json.loads((first / "results.json").read_text())["runs"][0]
    assert set(runs) == {0, 1} and runs[1]["devices"] == 2 and "adopted_from" not in runs[1]
    assert runs[0]["adopted_from"] and runs[0]["key"] == earlier["key"] and runs[0]["devices"] == 2
    assert not list((out / "locks").glob("ranks-*"))


@pytest.mark.slow  # ~15 s on a quiet 2-core machine
def test_sigterm_stops_the_suite_after_the_batch_without_publishing_the_run(tmp_path):
    """SIGTERM while the first of two runs trains: that run is not published (its attempt is deleted), the
    second never starts, the report is written and the exit status says the suite stopped."""
    suite = _suite(tmp_path, models=["realnvp"],
                   datasets={"8gaussians": {**SUITE["datasets"]["8gaussians"], "steps": 10 ** 7}})
    out = tmp_path / "out"
    process = _start(suite, out)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not list((out / "runs").glob("*.attempt-*/metrics.csv")):  # flushed after 100 steps: training
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:  # a suite that ignored the signal would train 10**7 steps
            process.kill()
            process.wait()
    assert process.returncode == 1, output[-3000:]
    assert "error: stopped: a stop signal (SIGTERM or Ctrl-C) ended the training of realnvp/8gaussians/seed0" \
        in output, output[-3000:]
    assert _trained(output) == Counter({"realnvp/8gaussians/seed0": 1})
    assert not (out / "runs").exists() or not list((out / "runs").iterdir())
    assert json.loads((out / "results.json").read_text())["runs"] == []
    assert "stopped: a stop signal" in (out / "table.md").read_text()


def test_a_wall_clock_suite_under_ddp_publishes_the_run_the_timer_ends_on_both_ranks(tmp_path):
    """A suite whose budget is time (``trainer.max_time``, as toy_nll.yaml) on 2 gloo ranks: rank zero's clock ends
    training for both, both agree the budget was spent (a rank that failed the run alone would hang the other), and
    the run is published with the steps it made."""
    trainer = {**SUITE["trainer"], "max_time": "00:00:00:03"}
    datasets = {"8gaussians": {**SUITE["datasets"]["8gaussians"], "steps": 10 ** 7}}
    suite, out = _suite(tmp_path, models=["realnvp"], seeds=[0], trainer=trainer, datasets=datasets), tmp_path / "out"
    _finish(_start(suite, out, "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["devices"] == 2 and 0 < run["global_step"] < 10 ** 7
