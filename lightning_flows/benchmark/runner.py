"""Run a benchmark suite: train every model of it through ``lightning-flows fit``, evaluate each with
the one evaluator on the weights a user samples from, write each result the moment it exists, then
the table and figures.

    lightning-flows benchmark --suite experiments/suites/quick.yaml --out outputs/benchmark
        [--only flow_matching vae] [--force] [--dry-run] [--logger csv|wandb] [--trainer.devices 2 ...]

Restartable: ``<out>/results/<dataset>__<model>__seed<s>.json`` carries the hash of everything that
defines it (config file, arguments, seed, evaluation settings); a rerun skips a run whose file has the
same hash, so killing the suite loses only the model in flight (``--force`` retrains everything).
Under DDP (``--trainer.devices N``) every rank trains and evaluates its share; rank zero writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch
import yaml

from lightning_flows.benchmark.environment import describe_device, environment
from lightning_flows.benchmark.suite import RunPlan, Suite, SuiteError, load_suite
from lightning_flows.checkpoints import allowed_model_classes
from lightning_flows.evaluation import Evaluator, sampling_weights
from lightning_flows.plotting import save_sample_figure
from lightning_flows.training import build_cli

SAMPLES_KEPT = {"image": 64, "points": 2000}  # per run, for the montage


def _is_rank_zero() -> bool:
    """True on global rank zero, also before Lightning has set up the process group (its launcher sets
    ``LOCAL_RANK``/``NODE_RANK`` for the processes it starts; torchrun and SLURM set ``RANK``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def result_path(out: Path, plan: RunPlan) -> Path:
    return out / "results" / f"{plan.slug}.json"


def finished_result(out: Path, plan: RunPlan) -> dict | None:
    """The stored result of ``plan`` if it exists and was produced by exactly this plan."""
    path = result_path(out, plan)
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return row if row.get("key") == plan.key() else None


def _logger_arg(plan: RunPlan, suite: Suite, out: Path, logger: str) -> str:
    save_dir = str(out / "runs")
    if logger == "wandb":
        return json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                           "init_args": {"save_dir": save_dir, "project": "lightning-flows", "group": suite.name,
                                         "name": plan.slug, "job_type": "benchmark"}})
    return json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": save_dir, "name": plan.slug, "version": ""}})


def run_arguments(plan: RunPlan, suite: Suite, out: Path, extra: list[str], logger: str) -> list[str]:
    """The complete ``lightning-flows fit`` command line of one run."""
    cls = model_class_of(plan.config)
    budget = {"trainer.max_steps": plan.steps * cls.optimizer_steps_per_batch, "trainer.max_epochs": -1,
              "trainer.default_root_dir": str(out / "runs" / plan.slug),
              "sample_grid.n": 0,  # the benchmark draws its own pictures from the evaluated samples
              "trainer.logger": _logger_arg(plan, suite, out, logger)}
    return plan.fit_args(budget) + ["--trainer.callbacks+=lightning_flows.callbacks.TrainingTimer"] + list(extra)


def _kept_samples(samples: torch.Tensor) -> torch.Tensor:
    return samples[: SAMPLES_KEPT["image" if samples.ndim == 4 else "points"]].detach().cpu()


def _evaluation_summary(spec) -> str:
    parts = [f"likelihood on {spec.likelihood_split}"] if spec.likelihood else []
    parts += [f"{spec.n_samples} samples"] if spec.quality or spec.timing else []
    return ", ".join(parts) or "nothing to measure"


def run_one(plan: RunPlan, suite: Suite, out: Path, extra: list[str], logger: str) -> dict | None:
    """Train and evaluate one run; returns its row on rank zero (None elsewhere)."""
    from lightning_flows.callbacks import TrainingTimer

    args = run_arguments(plan, suite, out, extra, logger)
    # The key of what this run trains, taken as it starts: a config edited while it trains must not make
    # its result pass for the edited config's.
    key = plan.key()
    start = time.perf_counter()
    cli = build_cli(args)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
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
           "command": "lightning-flows " + shlex.join(args), "wall_seconds": time.perf_counter() - start}
    samples = evaluator.last_samples
    if samples is not None:
        kept = _kept_samples(samples)
        (out / "samples").mkdir(parents=True, exist_ok=True)
        torch.save(kept, out / "samples" / f"{plan.slug}.pt")
        reference = datamodule.split(plan.evaluation.reference_split)[: len(kept)] if kept.ndim == 2 else None
        picture = save_sample_figure(datamodule.to_pixels(kept), out / "samples" / f"{plan.slug}.png",
                                     title=plan.name, reference=reference)
        row["samples_png"] = str(picture.relative_to(out))
    if logger == "wandb":
        from lightning_flows.benchmark.tracking import log_run_result

        log_run_result(trainer, row)
    _atomic_write(result_path(out, plan), json.dumps(row, indent=1, default=str) + "\n")
    return row


def dry_run(suite: Suite, out: Path, extra: list[str]) -> list[dict]:
    """Build every model and DataModule of ``suite`` (on the CPU, one device) and push a tiny fake batch
    through each model's objective; return and print the plan. No data is read or downloaded."""
    from lightning_flows.benchmark.table import format_plan

    plan_rows = []
    for plan in suite.runs:
        if plan.seed != suite.seeds[0]:
            continue
        args = run_arguments(plan, suite, out, extra, "csv") + [
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


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """Stop this worker once the suite process that started it is gone (killed by SIGTERM or SIGKILL, which,
    unlike Ctrl-C, reach only the parent): an orphaned run would keep training for minutes, competing with
    the rerun for the cores. The result of a run in flight is lost either way; finished ones stay on disk."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _start_worker(threads: int, parent: int) -> None:
    """Set up one worker process of a parallel suite: ``threads`` intra-op threads, gone with its parent."""
    _exit_with_parent(parent)
    torch.set_num_threads(threads)


def _run_in_worker(plan: RunPlan, suite: Suite, out: Path, extra: list[str], logger: str) -> dict:
    """``run_one`` in a worker process (parallel CPU runs)."""
    quiet = dataclasses.replace(plan, evaluation=dataclasses.replace(plan.evaluation, progress=False))
    row = run_one(quiet, suite, out, extra + ["--trainer.enable_progress_bar", "false"], logger)
    return {"wall_seconds": row["wall_seconds"], "train_seconds": row["train_seconds"], "weights": row["weights"]}


def _run_parallel(todo: list[RunPlan], suite: Suite, out: Path, extra: list[str], logger: str, jobs: int,
                  started: float) -> None:
    """Run ``todo`` ``jobs`` at a time in ``jobs`` worker processes with ``cores // jobs`` threads each. Each
    run is seeded on its own and deterministic at a fixed thread count, so neither the order of completion
    nor which worker ran what before changes a number (a worker runs one plan after another, as ``--jobs 1``
    does in the suite's own process; a fresh process per run cost ~5 s of imports each)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(threads, os.getpid())) as pool:
        pending = {}
        queue = list(enumerate(todo, 1))
        while queue or pending:
            while queue and len(pending) < jobs:
                i, plan = queue.pop(0)
                say(f"[{i}/{len(todo)}] {plan.name}: training {plan.steps} steps at batch {plan.batch_size} "
                    f"({plan.config}, {threads} thread(s))")
                pending[pool.submit(_run_in_worker, plan, suite, out, extra, logger)] = (i, plan)
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, plan = pending.pop(future)
                row = future.result()  # a failed run stops the suite; finished results stay on disk
                left = len(queue) + len(pending)
                say(f"[{i}/{len(todo)}] {plan.name}: done in {row['wall_seconds']:.0f} s (training "
                    f"{row['train_seconds']:.0f} s, weights: {row['weights']}); {left} to go, "
                    f"{(time.perf_counter() - started) / 60:.1f} min so far")


def run_suite(suite_path: str | Path, out_dir: str | Path, only: list[str] | None = None, force: bool = False,
              extra: list[str] | None = None, logger: str = "csv", root: str | Path = ".",
              jobs: int = 1) -> Path | None:
    """Run (or resume) a suite; returns the path of ``table.md`` on rank zero. ``jobs > 1`` trains that
    many runs at once in separate processes (CPU machines; not with multi-device DDP)."""
    from lightning_flows.benchmark.report import write_report

    suite = load_suite(suite_path, root)
    out, extra = Path(out_dir), list(extra or [])
    plans = [p for p in suite.runs if not only or p.model in only or p.dataset in only]
    if not plans:
        raise SuiteError(f"--only {' '.join(only or [])} selects no run of suite '{suite.name}' (models: "
                         f"{', '.join(suite.models)}; datasets: {', '.join(suite.datasets)}).")
    started = time.perf_counter()
    todo = [p for p in plans if force or finished_result(out, p) is None]
    say(f"suite '{suite.name}': {len(plans)} runs ({len(plans) - len(todo)} already finished, {len(todo)} to go) "
        f"on {describe_device()}; results in {out}/")
    if jobs > 1 and len(todo) > 1:
        _run_parallel(todo, suite, out, extra, logger, jobs, started)
        todo = []
    for i, plan in enumerate(todo, 1):
        elapsed = time.perf_counter() - started
        eta = "" if i == 1 else f", about {elapsed / (i - 1) * (len(todo) - i + 1) / 60:.1f} min left"
        say(f"[{i}/{len(todo)}] {plan.name}: training {plan.steps} steps at batch {plan.batch_size} "
            f"({plan.config}){eta}")
        row = run_one(plan, suite, out, extra, logger)
        if row is not None:
            say(f"[{i}/{len(todo)}] {plan.name}: done in {row['wall_seconds']:.0f} s "
                f"(training {row['train_seconds']:.0f} s, weights: {row['weights']})")
    if not _is_rank_zero():
        return None
    rows = [finished_result(out, p) for p in plans]
    table = write_report(suite, [r for r in rows if r is not None], out, environment(root), logger=logger)
    say(f"wrote {table} ({time.perf_counter() - started:.0f} s)")
    return table


def benchmark_main(argv: list[str]) -> Path | None:
    parser = argparse.ArgumentParser(
        prog="lightning-flows benchmark",
        description="Train and evaluate every model of a suite under one budget; write table.md, results.json "
                    "and figures. Arguments after the options (e.g. --trainer.devices 2) go to every fit.")
    parser.add_argument("--suite", default="experiments/suites/quick.yaml", help="suite YAML")
    parser.add_argument("--out", default="outputs/benchmark", help="output directory")
    parser.add_argument("--only", nargs="*", help="run only these models or datasets")
    parser.add_argument("--force", action="store_true", help="retrain runs that already have a result")
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
    try:
        if opts.dry_run:
            dry_run(load_suite(opts.suite), Path(opts.out), extra)
            return None
        if opts.jobs < 1:
            parser.error(f"--jobs must be >= 1, got {opts.jobs}")
        return run_suite(opts.suite, opts.out, opts.only, opts.force, extra, opts.logger, jobs=opts.jobs)
    except SuiteError as err:
        raise SystemExit(f"error: {err}") from None
