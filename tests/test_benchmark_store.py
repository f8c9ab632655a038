"""The benchmark's output directory (issue 19): a run's lock belongs to the process holding it, and a SIGKILL at
any step of a commit leaves either the old finished run or the new one, complete, and nothing the next
process does not clean up. The store needs no torch, so the kill test runs many tiny processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from subprocess_runs import ROOT, python_env

from lightning_flows.benchmark.store import Claim, Holder, Store

SLUG = "8gaussians__realnvp__seed0"
OLD = {"result.json": None, "metrics.csv": "step,loss\n0,1.0\n", "checkpoints/last.ckpt": "old weights"}
NEW = {"metrics.csv": "step,loss\n0,0.5\n1,0.4\n", "checkpoints/last.ckpt": "new weights", "samples.png": "png"}

# Commits a new attempt over a finished one, announcing every filesystem call that a kill could interrupt
# (before and after it); at event number KILL_AT it stops and waits to be killed.
COMMIT = textwrap.dedent("""
    import os, shutil, sys, time
    from pathlib import Path
    from lightning_flows.benchmark.store import Store

    out, kill_at, events = Path(sys.argv[1]), int(sys.argv[2]), [0]

    def announce(name):
        print(events[0], name, flush=True)
        if events[0] == kill_at:
            time.sleep(120)  # killed here
        events[0] += 1

    def instrument(module, name):
        real = getattr(module, name)
        def call(*args, **kwargs):
            announce("before " + name)
            result = real(*args, **kwargs)
            announce("after " + name)
            return result
        setattr(module, name, call)

    claim = Store(out).claim("SLUG")
    attempt = claim.new_attempt("new")
    for name, text in NEW.items():
        (attempt / name).parent.mkdir(parents=True, exist_ok=True)
        (attempt / name).write_text(text)
    for name in ("replace", "symlink", "fsync", "unlink", "rmdir"):
        instrument(os, name)
    instrument(shutil, "rmtree")
    claim.commit(attempt, {"key": "k", "version": "new"})
    print("done", flush=True)
""").replace("SLUG", SLUG).replace("NEW", repr(NEW))


def _finished_run(out: Path) -> Path:
    """A committed run with result version 'old'."""
    claim = Store(out).claim(SLUG)
    attempt = claim.new_attempt("old")
    for name, text in OLD.items():
        if text is not None:
            (attempt / name).parent.mkdir(parents=True, exist_ok=True)
            (attempt / name).write_text(text)
    claim.commit(attempt, {"key": "k", "version": "old"})
    claim.release()
    return attempt


def _files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): p.read_text() for p in sorted(directory.rglob("*")) if p.is_file()}


def _run_commit(out: Path, kill_at: int) -> list[str]:
    process = subprocess.Popen([sys.executable, "-c", COMMIT, str(out), str(kill_at)], cwd=ROOT, env=python_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    for line in process.stdout:
        events.append(line.strip())
        if line.startswith(f"{kill_at} "):
            process.send_signal(signal.SIGKILL)
            break
    _, stderr = process.communicate(timeout=60)
    assert process.returncode in (0, -signal.SIGKILL), stderr
    return events


def test_sigkill_at_any_step_of_a_commit_leaves_the_old_or_the_new_run_complete(tmp_path):
    events = _run_commit(_scratch(tmp_path, "count"), kill_at=-1)
    assert events[-1] == "done"
    steps = len(events) - 1
    assert steps >= 20  # replace/symlink/fsync/unlink/rmdir/rmtree, each before and after
    outcomes = set()
    for kill_at in range(steps):
        out = _scratch(tmp_path, f"kill{kill_at}")
        _run_commit(out, kill_at)
        store = Store(out)
        row = store.stored(SLUG)
        assert row is not None and row["version"] in ("old", "new"), (kill_at, row)
        outcomes.add(row["version"])
        expected = {**{k: v for k, v in OLD.items() if v is not None}} if row["version"] == "old" else NEW
        committed = store.link(SLUG).resolve()
        assert {k: v for k, v in _files(committed).items() if k != "result.json"} == expected, kill_at
        # The next process to claim the run removes everything the kill left; the finished run stays.
        claim = store.claim(SLUG)
        assert isinstance(claim, Claim)
        claim.release()
        assert sorted(p.name for p in (out / "runs").iterdir()) == sorted([SLUG, committed.name]), kill_at
        assert not [p for p in committed.rglob(".*")], kill_at  # no temporary file in the committed run
    assert outcomes == {"old", "new"}  # the kills fell on both sides of the commit


def _scratch(tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    _finished_run(out)
    return out


def test_a_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder_script = textwrap.dedent(f"""
        import sys, time
        from lightning_flows.benchmark.store import Store
        claim = Store(sys.argv[1]).claim("{SLUG}")
        print("held", flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", holder_script, str(tmp_path)], cwd=ROOT, env=python_env(),
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        busy = Store(tmp_path).claim(SLUG)
        assert isinstance(busy, Holder) and busy.pid == process.pid
        assert f"process {process.pid} on " in busy.describe()
        other = Store(tmp_path).claim("8gaussians__realnvp__seed1")  # other runs are free
        assert isinstance(other, Claim)
        other.release()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    claim = Store(tmp_path).claim(SLUG)  # the kernel released the dead process's lock
    assert isinstance(claim, Claim)
    claim.release()


def test_a_discarded_attempt_never_touches_the_finished_run(tmp_path):
    finished = _finished_run(tmp_path)
    before = _files(finished)
    with Store(tmp_path).claim(SLUG) as claim:
        attempt = claim.new_attempt("failed")
        (attempt / "metrics.csv").write_text("half a run")
        claim.discard(attempt)
    assert not attempt.exists() and _files(finished) == before
    assert Store(tmp_path).stored(SLUG)["version"] == "old"


def test_an_attempt_cannot_reuse_the_finished_runs_directory(tmp_path):
    _finished_run(tmp_path)
    with Store(tmp_path).claim(SLUG) as claim, pytest.raises(RuntimeError, match="finished run"):
        claim.new_attempt("old")


def test_an_older_versions_run_directory_is_replaced_only_by_a_finished_attempt(tmp_path):
    """Before this layout runs/<slug> was a real directory: not recognised as a result, kept until a new
    attempt commits, then replaced."""
    legacy = tmp_path / "runs" / SLUG
    legacy.mkdir(parents=True)
    (legacy / "metrics.csv").write_text("old layout")
    store = Store(tmp_path)
    assert store.stored(SLUG) is None
    with store.claim(SLUG) as claim:
        assert (legacy / "metrics.csv").is_file()  # a claim alone touches nothing
        attempt = claim.new_attempt("new")
        claim.commit(attempt, {"key": "k", "version": "new"})
    assert store.stored(SLUG)["version"] == "new"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([SLUG, attempt.name])
    assert json.loads((store.link(SLUG) / "result.json").read_text())["version"] == "new"
    assert os.readlink(store.link(SLUG)) == attempt.name  # relative: the output directory can move


def test_temporary_files_of_a_killed_report_writer_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "samples").mkdir()
    leftovers = [tmp_path / ".table.123.tmp.md", tmp_path / "samples" / ".8gaussians__vae__seed0.123.tmp.png"]
    kept = [tmp_path / "table.md", tmp_path / "samples" / "8gaussians__vae__seed0.png"]
    for path in leftovers + kept:
        path.write_text("x")
    with Store(tmp_path).report_lock():
        Store(tmp_path).remove_report_leftovers()
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
