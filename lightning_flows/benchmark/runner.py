"""Run a benchmark suite: train every model of it through ``lightning-flows fit``, evaluate each with
the one evaluator on the weights a user samples from, commit each result the moment it exists, then
write the table and figures from every result on disk.

    lightning-flows benchmark --suite experiments/suites/quick.yaml --out outputs/benchmark
        [--only flow_matching vae] [--force] [--dry-run] [--logger csv|wandb] [--trainer.devices 2 ...]

How one suite invocation goes (:func:`run_suite`):

1. **Check** the suite file and the arguments (:func:`~lightning_flows.benchmark.suite.load_suite`): a mistake
   stops here, before anything is written.
2. **Plan**: every run of the suite gets the benchmark's extra fit arguments; its key hashes everything that
   defines its result (config file, arguments, extra arguments, seed, budget, evaluation; see ``RunPlan.key``).
   ``--only`` selects which runs this invocation trains; those whose key matches a finished result are skipped
   (``--force`` retrains them).
3. **Attempt** each remaining run (:func:`attempt_run`): take its lock, train and evaluate it in a fresh attempt
   directory, and commit it, replacing its previous result atomically (:mod:`lightning_flows.benchmark.store`).
   A run another process holds is skipped and named; a run that fails is reported and the suite goes on.
4. **Report** (:func:`write_suite_report`): under the report lock, table.md, table.csv, results.json and the
   figures are rebuilt from every finished run of the whole suite whose key matches its plan, whoever trained
   it; the runs without such a result are listed with the reason. Every process rewrites the report when its
   own work is done, so the last one to finish leaves the complete report.
5. **Exit** non-zero with a summary when a run failed (finished runs are kept). SIGTERM or Ctrl-C while a run
   trains stops it after the batch (``RunCheckpoint``) and then the suite: that attempt is deleted, no other
   run starts, the report is written and the exit status is non-zero.

Concurrent invocations on one ``--out`` (two ``--only`` sets, or the same command on several machines sharing
the directory) split the work run by run and never train a run twice. Killing the suite loses only the runs in
flight. Under DDP (``--trainer.devices N``) rank zero decides, locks and writes; the other ranks, which
Lightning starts by running this command again, follow its announcements (:class:`RankZeroAnnouncements`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import secrets
import shlex
import tempfile
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import partial
from pathlib import Path

import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_flows.benchmark.adopt import adopt_results
from lightning_flows.benchmark.environment import describe_device, environment
from lightning_flows.benchmark.store import Holder, Store
from lightning_flows.benchmark.suite import RunPlan, Suite, SuiteError, load_suite
from lightning_flows.callbacks.checkpointing import RunCheckpoint
from lightning_flows.checkpoints import allowed_model_classes
from lightning_flows.evaluation import Evaluator, sampling_weights
from lightning_flows.plotting import save_sample_figure
from lightning_flows.training import build_cli

SAMPLES_KEPT = {"image": 64, "points": 2000}  # per run, for the montage
# Rank zero's session, inherited by the ranks Lightning's launcher starts (see RankZeroAnnouncements).
SESSION_ENV = "LIGHTNING_FLOWS_BENCHMARK_SESSION"
# Where each run goes is the benchmark's to decide (run directories are what make it safe, see store.py).
PLACEMENT_OPTIONS = ("--trainer.default_root_dir", "--trainer.logger")
# What each run trains on and for how long is the suite's (its rows report plan.dataset, plan.steps and
# plan.batch_size): an extra argument may not redefine it, or a row would report a budget it did not train.
BUDGET_OPTIONS = ("--trainer.max_steps", "--trainer.max_epochs", "--data.batch_size", "--data.dataset")


class RunsFailed(RuntimeError):
    """Some runs of the suite failed (the report of the others is written); the message lists them."""


def _is_rank_zero() -> bool:
    """True on global rank zero, also before Lightning has set up the process group (its launcher sets
    ``LOCAL_RANK``/``NODE_RANK`` for the processes it starts; torchrun and SLURM set ``RANK``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def say(message: str) -> None:
    if _is_rank_zero():
        print(f"[benchmark] {message}", flush=True)


def model_class_of(config: Path):
    """The family a config trains, looked up (never imported) from its ``model.class_path``."""
    class_path = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("class_path", "")
    table = allowed_model_classes()
    name = class_path if class_path in table else class_path.rsplit(".", 1)[-1]
    if name not in table:
        raise SuiteError(f"{config}: model.class_path {class_path!r} is not a lightning-flows model.")
    return table[name]


# --- command lines ---------------------------------------------------------------------------------------

def _budget(plan: RunPlan) -> dict[str, object]:
    return {"trainer.max_steps": plan.steps * model_class_of(plan.config).optimizer_steps_per_batch,
            "trainer.max_epochs": -1,
            "sample_grid.n": 0}  # the benchmark draws its own pictures from the evaluated samples


def _placement(plan: RunPlan, suite: Suite, run_dir: Path, logger: str) -> dict[str, object]:
    """Every file of the run in ``run_dir`` (one attempt directory, see store.py)."""
    if logger == "wandb":  # wandb's run directory is <save_dir>/<name>/<id>; the run is named after the plan
        spec = {"class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"save_dir": str(run_dir), "project": "lightning-flows", "group": suite.name,
                              "name": plan.slug, "job_type": "benchmark"}}
    else:
        spec = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir.parent), "name": run_dir.name, "version": ""}}
    return {"trainer.default_root_dir": str(run_dir), "trainer.logger": json.dumps(spec)}


def _measuring_callbacks(plan: RunPlan) -> list[str]:
    """The training clock and, when the suite asks for a curve, the evaluations during training (after the clock
    and any EMA callback, which EvaluationSchedule checks)."""
    args = ["--trainer.callbacks+=lightning_flows.callbacks.TrainingTimer"]
    full, cheap = plan.curve_steps()
    if full or cheap:
        schedule = {"class_path": "lightning_flows.callbacks.EvaluationSchedule",
                    "init_args": {"steps": full, "cheap_steps": cheap, "spec": plan.evaluation.to_dict()}}
        args.append(f"--trainer.callbacks+={json.dumps(schedule)}")
    return args


def run_arguments(plan: RunPlan, suite: Suite, run_dir: Path, logger: str) -> list[str]:
    """The complete ``lightning-flows fit`` command line of one run, trained in ``run_dir``."""
    return plan.fit_args({**_budget(plan), **_placement(plan, suite, run_dir, logger)}) + _measuring_callbacks(plan)


def reproduce_command(plan: RunPlan) -> str:
    """The command that trains this run by hand: the benchmark's, less its placement, so that it writes a new
    ``runs/<experiment>/version_N`` like any ``lightning-flows fit`` and never into the benchmark's directory."""
    return "lightning-flows " + shlex.join(plan.fit_args(_budget(plan)) + _measuring_callbacks(plan))


# --- one run ---------------------------------------------------------------------------------------------

def _kept_samples(samples: torch.Tensor) -> torch.Tensor:
    return samples[: SAMPLES_KEPT["image" if samples.ndim == 4 else "points"]].detach().cpu()


def _evaluation_summary(spec) -> str:
    parts = [f"likelihood on {spec.likelihood_split}"] if spec.likelihood else []
    parts += [f"{spec.n_samples} samples"] if spec.quality or spec.timing else []
    return ", ".join(parts) or "nothing to measure"


class IncompleteRun(RuntimeError):
    """Training stopped before the suite's budget: its numbers would not be the suite's."""


class SuiteInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped a run's training (saving its last.ckpt): the suite stops too."""


def _stopped_by_signal(trainer) -> bool:
    """SIGTERM or Ctrl-C ended this fit early: RunCheckpoint turns them into a stop after the batch, on every rank
    alike; Lightning's own handler (before RunCheckpoint's are installed) records a SIGTERM."""
    return trainer.received_sigterm or any(isinstance(c, RunCheckpoint) and c.stopped_by_signal
                                           for c in trainer.callbacks)


def _time_budget_spent(plan: RunPlan, trainer) -> bool:
    """The run's budget is wall-clock time (the suite file sets ``trainer.max_time``; its steps are then only a cap,
    as in experiments/suites/toy_nll.yaml) and Lightning's Timer ended training after at least one step: the budget
    was spent, not cut short. A ``--trainer.max_time`` given to the benchmark command is not the suite's budget: a
    run it stops is short. Rank zero's clock decides for every rank, as the Timer's own stop does, so all ranks
    publish or fail together."""
    from lightning.pytorch.callbacks import Timer

    declared = "trainer.max_time" in plan.args and trainer.global_step > 0
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if declared and timer is not None else None
    return bool(trainer.strategy.broadcast(remaining is not None and remaining <= 0))


def run_one(plan: RunPlan, suite: Suite, run_dir: Path, logger: str) -> dict | None:
    """Train and evaluate one run with every file in ``run_dir``; on rank zero, write ``samples.pt`` and
    ``samples.png`` there and return the result row (None elsewhere). Nothing is committed here."""
    from lightning_flows.callbacks import EvaluationSchedule, TrainingTimer
    from lightning_flows.callbacks.evaluation import curve_point

    args = run_arguments(plan, suite, run_dir, logger)
    # The key of what this run trains, taken as it starts: a config edited while it trains must not make
    # its result pass for the edited config's.
    key = plan.key()
    start = time.perf_counter()
    cli = build_cli(args)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if _stopped_by_signal(trainer):
        raise SuiteInterrupted(f"a stop signal (SIGTERM or Ctrl-C) ended the training of {plan.name} at step "
                               f"{trainer.global_step}")
    short = trainer.global_step < trainer.max_steps and not _time_budget_spent(plan, trainer)
    if short or trainer.interrupted:
        raise IncompleteRun(f"training stopped after {trainer.global_step} of {trainer.max_steps} optimizer steps "
                            f"(see the messages above); a run short of the suite's budget is not published.")
    timer = next(c for c in trainer.callbacks if isinstance(c, TrainingTimer))
    evaluator = Evaluator(plan.evaluation)
    say(f"{plan.name}: evaluating ({_evaluation_summary(plan.evaluation)})")
    with sampling_weights(trainer, model) as weights:
        result = evaluator.evaluate(model, datamodule, weights=weights)
    if trainer.global_rank != 0:
        return None
    world = trainer.world_size
    cls = type(model)
    row = {"suite": suite.name, "model": plan.model, "dataset": plan.dataset, "seed": plan.seed, "key": key,
           "family": cls.__name__, "objective": cls.objective, "likelihood_declared": model.likelihood,
           "params": sum(p.numel() for p in model.parameters()), "optimizer_steps": plan.steps,
           "global_step": trainer.global_step, "batch_size": plan.batch_size, "devices": world,
           "train_seconds": timer.seconds, "examples_per_second": timer.examples * world / max(timer.seconds, 1e-9),
           **result, "reasons": plan.reasons, "evaluation": plan.evaluation.to_dict(),
           "extra_arguments": list(plan.extra), "command": reproduce_command(plan), "attempt": run_dir.name,
           "threads": torch.get_num_threads()}
    if plan.evaluate_at or plan.cheap_evaluate_at:
        schedule = next((c for c in trainer.callbacks if isinstance(c, EvaluationSchedule)), None)
        points = schedule.points if schedule is not None else []  # none when the schedule is only 100%
        # The last point is the final evaluation itself (at 100%, never evaluated twice).
        row["curve"] = sorted(points, key=lambda p: p["step"]) + [
            curve_point(result, plan.steps, timer.seconds)]
        row["evaluate_at"], row["cheap_evaluate_at"] = list(plan.evaluate_at), list(plan.cheap_evaluate_at)
    samples = evaluator.last_samples
    if samples is not None:
        kept = _kept_samples(samples)
        torch.save(kept, run_dir / "samples.pt")
        reference = datamodule.split(plan.evaluation.reference_split)[: len(kept)] if kept.ndim == 2 else None
        save_sample_figure(datamodule.to_pixels(kept), run_dir / "samples.png", title=plan.name, reference=reference)
        row["samples_png"] = f"samples/{plan.slug}.png"  # where the report publishes it
    if logger == "wandb":
        from lightning_flows.benchmark.tracking import log_run_result

        log_run_result(trainer, row)
    row["wall_seconds"] = time.perf_counter() - start
    return row


# --- one attempt: lock, fresh directory, commit --------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    """What became of one run in this invocation."""

    run: str  # plan.name
    # "trained", "busy" (another process holds it), "finished" (by another process meanwhile), "failed", or
    # "stopped" (by SIGTERM or Ctrl-C: the suite stops)
    status: str
    detail: str = ""  # the holder (busy) or the error (failed)
    wall_seconds: float = 0.0
    train_seconds: float = 0.0
    weights: str = ""


def _reason(err: BaseException) -> str:
    if isinstance(err, SystemExit):  # the fit command line was refused; its parser printed why
        return f"its fit command line was refused (exit status {err.code}; the reason is printed above)"
    text = str(err).strip() or repr(err)
    return text if isinstance(err, (IncompleteRun, ValueError)) else f"{type(err).__name__}: {text}"


def attempt_run(plan: RunPlan, suite: Suite, store: Store, logger: str, attempt_id: str,
                force_since: float | None = None, progress: str = "",
                announce: RankZeroAnnouncements | None = None) -> Outcome:
    """Train ``plan`` unless another process holds it or finished it meanwhile, and commit it.

    ``force_since``: retrain a finished result unless it finished after this time (``--force``: every run once
    per invocation, however many invocations force the same runs at once). ``announce`` tells the other DDP
    ranks which run to join. A run that fails leaves no trace but its message; its previous result is kept.
    """
    claim = store.claim(plan.slug)
    if isinstance(claim, Holder):
        return Outcome(plan.name, "busy", claim.describe())
    with claim:
        # Checked again under the lock: another process may have finished the run since the plan was made.
        row = store.finished(plan.slug, plan.key())
        if row is not None and (force_since is None or row.get("finished_at", 0.0) >= force_since):
            return Outcome(plan.name, "finished", "another process finished it meanwhile")
        run_dir = claim.new_attempt(attempt_id)
        extra = f", then {shlex.join(plan.extra)}" if plan.extra else ""
        say(f"{progress}{plan.name}: training {plan.steps} steps at batch {plan.batch_size} ({plan.config}{extra}; "
            f"{torch.get_num_threads()} thread(s)) in {run_dir}")
        if announce is not None:
            announce.run(plan.slug, run_dir)
        try:
            row = run_one(plan, suite, run_dir, logger)
            row["finished_at"] = time.time()
            claim.commit(run_dir, row)
        except (SuiteInterrupted, SIGTERMException) as err:
            claim.discard(run_dir)
            return Outcome(plan.name, "stopped", str(err) or f"SIGTERM while {plan.name} was set up")
        except (Exception, SystemExit) as err:
            claim.discard(run_dir)
            if not isinstance(err, (IncompleteRun, ValueError, SystemExit)):
                traceback.print_exc()  # not a setting the user can fix from the message alone: show where
            return Outcome(plan.name, "failed", _reason(err))
        except BaseException:  # Ctrl-C: nothing half-done stays behind
            claim.discard(run_dir)
            raise
    return Outcome(plan.name, "trained", wall_seconds=row["wall_seconds"], train_seconds=row["train_seconds"],
                   weights=str(row.get("weights", "")))


class RankZeroAnnouncements:
    """Under DDP, the runs rank zero trains, in order, for the other ranks: ``<out>/locks/ranks-<session>.jsonl``.

    Only rank zero takes locks and decides which runs to skip, and Lightning starts the other ranks by running
    the benchmark command again (once, at rank zero's first fit): those processes read here which run to join
    (slug and attempt directory) instead of deciding for themselves, which could differ. A header line with
    rank zero's start time, one JSON line per run, then ``{"end": true}``; the file is removed when rank
    zero's suite ends. The session is unique per invocation and reaches the other ranks through the
    environment the launcher copies. (Ranks an external launcher starts together share an id derived from the
    launcher's; there a follower ignores a file whose header is older than the job, left by a killed one.)
    """

    def __init__(self, store: Store, session: str):
        self.path = store.locks / f"ranks-{session}.jsonl"

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"started": time.time(), "pid": os.getpid()}) + "\n")

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as handle:  # one write per line: a reader sees whole lines or none
            handle.write(json.dumps(entry) + "\n")

    def run(self, slug: str, run_dir: Path) -> None:
        self._append({"slug": slug, "run_dir": str(run_dir)})

    def close(self) -> None:
        self._append({"end": True})

    def remove(self) -> None:
        """Remove the file, unless ranks that an external launcher started may still have to find it (there it
        stays, a few bytes; the next job of the same ids rewrites it)."""
        if not self.path.name.startswith("ranks-job-"):
            self.path.unlink(missing_ok=True)

    def _lines(self, not_before: float | None) -> list[dict] | None:
        """The announcements after the header; [] before rank zero wrote any; None once rank zero removed them."""
        try:
            lines = [json.loads(line) for line in self.path.read_text().split("\n")[:-1]]
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return []
        if not lines or (not_before is not None and lines[0].get("started", 0.0) < not_before):
            return []  # not written yet, or a killed job's
        return lines[1:]

    def follow(self, not_before: float | None = None, poll: float = 0.1):
        """Yield ``(slug, run_dir)`` as rank zero announces them; stop at the end, or when this process's
        parent (rank zero, or the external launcher) is gone."""
        parent, seen, found = os.getppid(), 0, False
        while True:
            lines = self._lines(not_before)
            if lines is None and found:
                return  # rank zero removed the file after its last announcement
            found = found or lines is not None
            lines = lines or []
            if len(lines) > seen:
                entry = lines[seen]
                seen += 1
                if entry.get("end"):
                    return
                yield entry["slug"], Path(entry["run_dir"])
            elif os.getppid() != parent:
                raise SystemExit("error: the process that started this benchmark rank is gone; stopping it.")
            else:
                time.sleep(poll)


def _session(rank_zero: bool) -> str:
    """The id of this invocation's announcements: new on rank zero, inherited by the ranks Lightning's launcher
    starts. Ranks an external launcher starts together (torchrun, srun) derive the same id from the launcher's."""
    if any(name in os.environ for name in ("RANK", "SLURM_PROCID")) and "MASTER_PORT" in os.environ:
        shared = "|".join(os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                                                                 "MASTER_ADDR", "MASTER_PORT"))
        return "job-" + hashlib.sha256(shared.encode()).hexdigest()[:12]
    if not rank_zero and os.environ.get(SESSION_ENV):
        return os.environ[SESSION_ENV]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


# --- dry run ---------------------------------------------------------------------------------------------

def dry_run(suite: Suite, out: Path, extra: list[str]) -> list[dict]:
    """Build every model and DataModule of ``suite`` (on the CPU, one device) and push a tiny fake batch
    through each model's objective; return and print the plan. Nothing is read, downloaded or written
    (``out`` is not touched: the runs are placed in a temporary directory)."""
    from lightning_flows.benchmark.table import format_plan

    plan_rows = []
    with tempfile.TemporaryDirectory(prefix="lightning-flows-dry-run-") as scratch:
        for plan in suite.runs:
            if plan.seed != suite.seeds[0]:
                continue
            plan = plan.with_extra(extra)
            args = run_arguments(plan, suite, Path(scratch) / plan.slug, "csv") + [
                "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                "--trainer.logger", "false"]
            cli = build_cli(args[1:] if args[0] == "fit" else args, run=False)
            model, datamodule = cli.model, cli.datamodule
            fake = torch.rand(2, *datamodule.data_shape) * 2 - 1  # model space of any dataset
            # A conditional run's batches are labelled (x, y): so is its fake batch.
            labels = (torch.arange(2) % datamodule.num_classes,) if datamodule.num_classes else ()
            loss = model.training_loss(fake, *labels)
            if loss.ndim != 0 or not torch.isfinite(loss):
                raise RuntimeError(f"dry run of {plan.name}: the objective on a fake batch gave {loss}.")
            plan_rows.append({"run": f"{plan.model}/{plan.dataset}", "config": str(plan.config),
                              "family": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                              "steps": plan.steps, "batch_size": plan.batch_size,
                              "evaluation": f"n={plan.evaluation.n_samples}, {plan.evaluation.feature_extractor}"
                                            f" vs {plan.evaluation.reference_split}", "seeds": len(suite.seeds)})
    print(format_plan(suite, plan_rows, extra), flush=True)
    return plan_rows


# --- parallel runs (CPU) ---------------------------------------------------------------------------------

def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Stop this worker once the suite process that started it is gone (killed by SIGTERM or SIGKILL, which,
    unlike Ctrl-C, reach only the parent): an orphaned run would keep training for minutes, competing with
    the rerun for the cores. The run in flight is lost either way (its lock dies with this worker, and the
    next process that claims the run deletes the attempt); finished ones stay on disk."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _start_worker(threads: int, parent: int) -> None:
    """Set up one worker process of a parallel suite: ``threads`` intra-op threads, gone with its parent."""
    _exit_with_parent(parent)
    torch.set_num_threads(threads)


def _quiet(plan: RunPlan) -> RunPlan:
    """``plan`` without progress bars (parallel runs would garble each other's); no number changes."""
    return dataclasses.replace(plan, evaluation=dataclasses.replace(plan.evaluation, progress=False),
                               extra=plan.extra + ("--trainer.enable_progress_bar", "false"))


def _run_parallel(todo: list[RunPlan], attempt, jobs: int, report) -> None:
    """Attempt ``todo`` ``jobs`` at a time in ``jobs`` worker processes with ``cores // jobs`` threads each. Each
    run is seeded on its own and deterministic at a fixed thread count, so neither the order of completion
    nor which worker ran what before changes a number (a worker runs one plan after another, as ``--jobs 1``
    does in the suite's own process; a fresh process per run cost ~5 s of imports each). Each worker takes
    the lock of the run it trains itself, so the lock dies with the process that writes."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(threads, os.getpid())) as pool:
        pending = {}
        queue = list(enumerate(todo, 1))
        while queue or pending:
            while queue and len(pending) < jobs:
                i, plan = queue.pop(0)
                pending[pool.submit(attempt, _quiet(plan), progress=f"[{i}/{len(todo)}] ")] = (i, plan)
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, plan = pending.pop(future)
                try:
                    outcome = future.result()
                except Exception as err:  # the worker died (e.g. killed for memory): its lock died with it
                    outcome = Outcome(plan.name, "failed", f"its worker process died ({type(err).__name__}: {err})")
                if outcome.status == "stopped":
                    queue.clear()  # a signal stopped a worker's run: start no other
                report(i, outcome, len(queue) + len(pending))


# --- the suite -------------------------------------------------------------------------------------------

def _say_outcome(progress: str, outcome: Outcome, left: int, started: float) -> None:
    if outcome.status == "trained":
        say(f"{progress}{outcome.run}: done in {outcome.wall_seconds:.0f} s (training {outcome.train_seconds:.0f} s, "
            f"weights: {outcome.weights}); {left} to go, {(time.perf_counter() - started) / 60:.1f} min so far")
    elif outcome.status == "busy":
        say(f"{progress}{outcome.run}: skipped, {outcome.detail} is training it (and rewrites the report when it "
            f"finishes)")
    elif outcome.status == "finished":
        say(f"{progress}{outcome.run}: skipped, {outcome.detail}")
    elif outcome.status == "stopped":
        say(f"{progress}{outcome.run}: stopped ({outcome.detail}); its attempt is deleted, no further run starts")
    else:
        say(f"{progress}{outcome.run}: FAILED (its previous result, if any, is kept): {outcome.detail}")


def _failure_summary(failed: list[Outcome], total: int) -> str:
    by_reason: dict[str, list[str]] = {}
    for outcome in failed:
        by_reason.setdefault(outcome.detail, []).append(outcome.run)
    lines = [f"{len(failed)} of {total} runs failed (finished runs are kept; fix the cause and run the same "
             f"command again to retrain only what is missing):"]
    lines += [f"  {', '.join(runs)}: {reason}" for reason, runs in by_reason.items()]
    return "\n".join(lines)


def run_suite(suite_path: str | Path, out_dir: str | Path, only: list[str] | None = None, force: bool = False,
              extra: list[str] | None = None, logger: str = "csv", root: str | Path = ".",
              jobs: int = 1, adopt: str | Path | None = None) -> Path | None:
    """Run (or resume) a suite; returns the path of ``table.md`` on rank zero. ``jobs > 1`` trains that
    many runs at once in separate processes (CPU machines; not with multi-device DDP). ``adopt``: an earlier
    report's results.json whose rows of unchanged runs become finished runs first
    (:mod:`lightning_flows.benchmark.adopt`). Raises :class:`RunsFailed` (after writing the report) when a run
    failed."""
    suite = load_suite(suite_path, root)
    store, extra = Store(out_dir), list(extra or [])
    every_plan = [plan.with_extra(extra) for plan in suite.runs]
    plans = [p for p in every_plan if not only or p.model in only or p.dataset in only]
    if not plans:
        raise SuiteError(f"--only {' '.join(only or [])} selects no run of suite '{suite.name}' (models: "
                         f"{', '.join(suite.models)}; datasets: {', '.join(suite.datasets)}).")
    if adopt is not None and _is_rank_zero():
        # Every run of the suite, not only --only's: the report shows them all. --force still retrains --only's.
        say(adopt_results(store, every_plan, Path(adopt)).summary(Path(adopt)))
    session = _session(_is_rank_zero())
    announcements = RankZeroAnnouncements(store, session)
    if not _is_rank_zero():
        _follow_rank_zero(announcements, every_plan, suite, logger)
        return None
    os.environ[SESSION_ENV] = session  # for the ranks Lightning's launcher starts (they copy the environment)
    started, force_since = time.perf_counter(), (time.time() if force else None)
    todo = [p for p in plans if force or store.finished(p.slug, p.key()) is None]
    say(f"suite '{suite.name}': {len(plans)} runs ({len(plans) - len(todo)} already finished, {len(todo)} to go) "
        f"on {describe_device()}; results in {store.out}/")
    outcomes: list[Outcome] = []
    # One attempt id per invocation (a run is attempted at most once in it): runs/<slug>.attempt-<id>. The random
    # part keeps two invocations of one process within the same second apart (the rerun that replaces a run
    # finished a moment ago must not be handed that run's own directory).
    attempt_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    attempt = partial(attempt_run, suite=suite, store=store, logger=logger, attempt_id=attempt_id,
                      force_since=force_since)

    def report(i: int, outcome: Outcome, left: int) -> None:
        outcomes.append(outcome)
        _say_outcome(f"[{i}/{len(todo)}] ", outcome, left, started)

    if jobs > 1 and len(todo) > 1:
        _prepare_point_nulls(todo, suite)
        _run_parallel(todo, attempt, jobs, report)
    else:
        announcements.open()
        try:
            for i, plan in enumerate(todo, 1):
                report(i, attempt(plan, progress=f"[{i}/{len(todo)}] ", announce=announcements), len(todo) - i)
                if outcomes[-1].status == "stopped":
                    break
                if outcomes[-1].status == "failed" and _distributed():
                    say("stopping: under DDP a failed run leaves the other ranks out of step.")
                    break
        finally:
            announcements.close()
            announcements.remove()
    table = write_suite_report(suite, every_plan, store, root, logger, outcomes)
    say(f"wrote {table} ({time.perf_counter() - started:.0f} s)")
    busy = [o for o in outcomes if o.status == "busy"]
    if busy:
        say(f"{len(busy)} run(s) were being trained by other processes ({', '.join(o.run for o in busy)}); "
            f"each process rewrites the report when it finishes, so the last one leaves it complete.")
    stopped = [o for o in outcomes if o.status == "stopped"]
    if stopped:
        raise RunsFailed(f"stopped: {stopped[0].detail}; that attempt was deleted and the finished runs are kept. "
                         f"Run the same command again to continue.")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        raise RunsFailed(_failure_summary(failed, len(todo)))
    return table


def _follow_rank_zero(announcements: RankZeroAnnouncements, plans: list[RunPlan], suite: Suite, logger: str) -> None:
    """A rank other than zero: join each run rank zero announces (training and evaluation are collective)."""
    by_slug = {plan.slug: plan for plan in plans}
    # A rank Lightning's launcher started inherited rank zero's unique session; ranks started together by an
    # external launcher started within minutes of rank zero.
    not_before = time.time() - 600 if announcements.path.name.startswith("ranks-job-") else None
    for slug, run_dir in announcements.follow(not_before):
        try:
            run_one(by_slug[slug], suite, run_dir, logger)
        except SuiteInterrupted:
            return  # every rank stopped at the same batch; rank zero ends the suite


def _prepare_point_nulls(plans: list[RunPlan], suite: Suite) -> None:
    """Compute each 2D dataset's real-vs-real null here, once, with this process's threads, before parallel runs
    start: it is data only and cached on disk, and otherwise the first runs of a dataset would each compute it at
    one thread, at the same time (~30 s each for 200 draws of 2,000 points)."""
    done: set[tuple] = set()
    for plan in plans:
        spec = plan.evaluation
        key = (plan.dataset, spec.reference_split, spec.n_samples, spec.null_draws, spec.cache_dir)
        if key in done:
            continue
        done.add(key)
        datamodule = suite.datamodule(plan.dataset)
        if len(datamodule.data_shape) == 1 and spec.n_samples > 1:  # 2D point data
            Evaluator(spec).point_reference(datamodule, spec.n_samples)


def _with_current_null(row: dict, plan: RunPlan, suite: Suite, datamodules: dict) -> dict:
    """``row`` with the real-vs-real null of this evaluator (``Evaluator.refresh_nulls``): the null is data only and
    its draw count is not part of the key, so an adopted or earlier run shows today's null without retraining. Kept
    as it was, with a message, when the suite's data is not the reference the run was scored against."""
    if "null_draws" not in row:
        return row
    if plan.dataset not in datamodules:
        datamodules[plan.dataset] = suite.datamodule(plan.dataset)
    try:
        return Evaluator(plan.evaluation).refresh_nulls(row, datamodules[plan.dataset])
    except ValueError as err:
        say(f"{plan.name}: {err}")
        return row


def write_suite_report(suite: Suite, plans: list[RunPlan], store: Store, root: str | Path, logger: str,
                       outcomes: list[Outcome]) -> Path:
    """The report from every finished run of ``plans`` (the whole suite) whose key matches, under the report
    lock; the runs without one are named with the reason (``outcomes``: what this invocation saw)."""
    from lightning_flows.benchmark.report import write_report

    seen = {o.run: o for o in outcomes}
    datamodules: dict[str, object] = {}
    with store.report_lock():
        store.remove_report_leftovers()
        rows, missing = [], {}
        for plan in plans:
            row = store.finished(plan.slug, plan.key())
            if row is not None:
                rows.append(_with_current_null(row, plan, suite, datamodules))
                continue
            outcome = seen.get(plan.name)
            if outcome is not None and outcome.status == "busy":
                missing[plan.name] = f"being trained by {outcome.detail}"
            elif outcome is not None and outcome.status in ("failed", "stopped"):
                missing[plan.name] = f"{outcome.status}: {outcome.detail}"
            elif store.stored(plan.slug) is not None:
                missing[plan.name] = ("has a result of other settings (config, arguments or evaluation changed "
                                      "since), not shown")
            else:
                missing[plan.name] = "no result yet"
        return write_report(suite, rows, store.out, environment(root), logger=logger, missing=missing)


def benchmark_main(argv: list[str]) -> Path | None:
    parser = argparse.ArgumentParser(
        prog="lightning-flows benchmark",
        description="Train and evaluate every model of a suite under one budget; write table.md, results.json "
                    "and figures. Arguments after the options (e.g. --trainer.devices 2) go to every fit and are "
                    "part of each run's key (the dataset, steps and batch size are the suite file's). Several "
                    "processes may share one --out: each trains the runs no other process holds, and the report "
                    "lists every finished run of the suite.")
    parser.add_argument("--suite", default="experiments/suites/quick.yaml", help="suite YAML")
    parser.add_argument("--out", default="outputs/benchmark", help="output directory")
    parser.add_argument("--only", nargs="*", help="train only these models or datasets (the report shows all)")
    parser.add_argument("--force", action="store_true", help="retrain runs that already have a result")
    parser.add_argument("--adopt", metavar="RESULTS_JSON",
                        help="first adopt the runs of an earlier report of this suite (its results.json, e.g. a "
                             "committed snapshot) whose key equals this suite's: e.g. --only cnf --adopt "
                             "experiments/results/standard/results.json retrains the CNF and reports it beside "
                             "the snapshot's other runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="build every model and DataModule on tiny fake data and print the plan")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train this many runs at once, each in its own process with cores/jobs threads "
                             "(CPU machines; keep 1 with --trainer.devices > 1)")
    parser.add_argument("--logger", choices=("csv", "wandb"), default="csv",
                        help="wandb: one run per model in a group named after the suite, plus a summary run")
    opts, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("--") and not a.startswith(("--trainer.", "--data.", "--model."))]
    if bad:
        parser.error(f"unknown option(s) {' '.join(bad)}; extra options must be --trainer.*, --data.* or --model.*")
    placed = [a for a in extra if a.split("=", 1)[0] in PLACEMENT_OPTIONS or a.startswith("--trainer.logger.")]
    if placed:
        parser.error(f"{' '.join(placed)}: the benchmark places every run in <--out>/runs/ itself (that is what "
                     f"keeps finished runs safe); choose the directory with --out and the logger with --logger.")
    budget = [a for a in extra if a.split("=", 1)[0] in BUDGET_OPTIONS]
    if budget:
        parser.error(f"{' '.join(budget)}: the suite file sets every run's dataset and budget (datasets.<name>.steps "
                     f"and .batch_size in {opts.suite}), and the table reports them; change them in (a copy of) "
                     f"the suite file instead.")
    if opts.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {opts.jobs}")
    try:
        if opts.dry_run:
            dry_run(load_suite(opts.suite), Path(opts.out), extra)
            return None
        return run_suite(opts.suite, opts.out, opts.only, opts.force, extra, opts.logger, jobs=opts.jobs,
                         adopt=opts.adopt)
    except (SuiteError, RunsFailed) as err:
        raise SystemExit(f"error: {err}") from None
