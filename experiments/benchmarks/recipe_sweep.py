"""Which optimisation recipe gives a family its best samples: weight averages (EMA), learning-rate schedule and
gradient clipping, measured through the shared evaluator at a suite's budget.

    python experiments/benchmarks/recipe_sweep.py --model flow_matching --seeds 0 1 \
        --recipes constant cosine+warmup50 cosine+warmup50+clip1 --emas none decay:0.995 decay:0.9999 halflife:0.2 \
        [--steps 3000] [--suite experiments/suites/quick.yaml --dataset digits] --out outputs/recipe

Each recipe is one training run per seed: the suite's own ``lightning-flows fit`` command for that model and
dataset (:func:`lightning_flows.benchmark.runner.run_arguments`), at ``--steps`` optimizer steps if given, with
the recipe's arguments added (a model the suite leaves out, e.g. ``nsf`` in the quick suite, trains from the
dataset's config folder under the same settings). Recipe tokens, joined by ``+``: ``constant`` / ``cosine``
(``lr_schedule``), ``warmupN`` (``warmup_steps: N``), ``clipX`` (``gradient_clip_val: X``), ``config`` (the config
as committed).
Every EMA of ``--emas`` rides along on the SAME run (its own :class:`EMACallback`, not swapped in during
training), so the averages are compared on identical training trajectories; afterwards the shared evaluator
(:class:`lightning_flows.evaluation.Evaluator`, the suite's settings, the same evaluation seed) scores each:
``none`` = the training weights, ``decay:D`` = ``EMACallback(decay=D)`` (with its warm-up
``min(D, (1 + n) / (10 + n))``), ``halflife:F`` = a half-life of ``F`` times the steps so far (see
:class:`SweptEMA`),
``config`` = the EMA the config itself keeps (e.g. diffusion's). One JSON row per (recipe, seed, EMA) goes to
``<out>/<dataset>__<model>__<recipe>__<ema>__seed<s>.json`` (a rerun skips rows already there) and the table
of means over seeds to ``<out>/recipe_sweep.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import torch  # noqa: E402

from lightning_flows.benchmark.runner import model_class_of, run_arguments  # noqa: E402
from lightning_flows.benchmark.suite import load_suite  # noqa: E402
from lightning_flows.callbacks import EMACallback  # noqa: E402
from lightning_flows.evaluation import Evaluator  # noqa: E402
from lightning_flows.training import build_cli  # noqa: E402

NUMBERS = ("fid", "kid", "precision", "recall", "class_accuracy", "class_fid", "bpd_exact", "bpd_estimate",
           "bpd_bound", "nll_gap_exact", "energy_distance")


def recipe_arguments(recipe: str) -> list[str]:
    """``cosine+warmup50+clip1`` -> the ``lightning-flows fit`` arguments that set it."""
    args: list[str] = []
    for token in recipe.split("+"):
        if token == "config":
            continue
        if token in ("constant", "cosine"):
            args += ["--model.init_args.lr_schedule", token]
        elif token.startswith("warmup"):
            args += ["--model.init_args.warmup_steps", str(int(token[len("warmup"):]))]
        elif token.startswith("clip"):
            args += ["--trainer.gradient_clip_val", str(float(token[len("clip"):]))]
        else:
            raise SystemExit(f"unknown recipe token {token!r}: use constant, cosine, warmupN, clipX or config.")
    return args


class SweptEMA(EMACallback):
    """One of several averages kept side by side: never swapped in by itself, saved under its own state key.

    ``half_life``: a fraction ``F`` of the run so far instead of a fixed decay: update ``n`` uses
    ``d_n = 0.5 ** (1 / (F (n + 1)))``, which halves a weight within the next ``F (n + 1)`` updates: a half-life
    of ``F`` times the run so far.
    (The callback's warm-up ``(1 + n) / (10 + n) ~ 1 - 9 / n`` is this rule with ``F = ln 2 / 9 = 0.077`` for as
    long as it stays below ``decay``.)"""

    def __init__(self, name: str, half_life: float | None = None, **kwargs):
        super().__init__(use_for_eval=False, **kwargs)
        self.name, self.half_life = name, half_life

    def current_decay(self) -> float:
        if self.half_life is None:
            return super().current_decay()
        return 0.5 ** (1.0 / (self.half_life * (self.num_updates + 1)))

    @property
    def state_key(self) -> str:
        return f"SweptEMA[{self.name}]"


def swept_ema(name: str) -> SweptEMA | None:
    kind, _, value = name.partition(":")
    if kind == "decay":
        return SweptEMA(name, decay=float(value))
    if kind == "halflife":
        return SweptEMA(name, half_life=float(value))
    if name in ("none", "config"):
        return None
    raise SystemExit(f"unknown EMA {name!r}: use none, config, decay:D or halflife:F.")


def train_and_evaluate(opts, suite, plan, recipe: str, out: Path) -> list[dict]:
    emas = {name: swept_ema(name) for name in opts.emas}
    pending = [name for name in emas if not row_path(out, plan, recipe, name).is_file()]
    if not pending:
        return []
    extra = recipe_arguments(recipe) + ["--trainer.enable_progress_bar", "false",
                                        "--trainer.enable_checkpointing", "false"]
    if opts.steps:
        extra += ["--trainer.max_steps", str(opts.steps * model_class_of(plan.config).optimizer_steps_per_batch)]
    args = run_arguments(plan, suite, out / "runs", "csv") + extra  # later arguments win: the recipe, the budget
    cli = build_cli(args[1:], run=False)  # without the subcommand: we call fit ourselves
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    swept = [cb for cb in emas.values() if cb is not None]
    trainer.callbacks.extend(swept)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    own = next((cb for cb in trainer.callbacks if type(cb) is EMACallback), None)
    if own is not None:
        own.swap_out(model)  # the config's average stays in the model after fit; start from the training weights
    # ms/sample is no part of the question (and its warm-up call would double the sampling time).
    spec = dataclasses.replace(plan.evaluation, timing=False, progress=False)
    rows = []
    for name in pending:
        if name == "config" and own is None:
            continue
        averaged = own if name == "config" else emas[name]
        likelihood = spec.likelihood and (opts.likelihood_for is None or name in opts.likelihood_for)
        evaluator = Evaluator(dataclasses.replace(spec, likelihood=likelihood))
        if averaged is not None:
            averaged.swap_in(model)
        try:
            start = time.perf_counter()
            result = evaluator.evaluate(model, datamodule, weights="training" if averaged is None else "ema")
        finally:
            if averaged is not None:
                averaged.swap_out(model)
        row = {"model": plan.model, "dataset": plan.dataset, "recipe": recipe, "ema": name, "seed": plan.seed,
               "steps": opts.steps or plan.steps, "batch_size": plan.batch_size, "train_seconds": train_seconds,
               "eval_seconds": time.perf_counter() - start, "global_step": trainer.global_step,
               "command": "lightning-flows " + " ".join(args), **result}
        row_path(out, plan, recipe, name).write_text(json.dumps(row, indent=1, default=str) + "\n")
        rows.append(row)
        print(f"[recipe] {plan.model} {recipe} seed {plan.seed} ema {name}: "
              + ", ".join(f"{k} {row[k]:.4g}" for k in NUMBERS if isinstance(row.get(k), float)), flush=True)
    return rows


def suite_plan(suite, model: str, dataset: str):
    """The suite's plan of ``model`` on ``dataset``; for a model the suite leaves out (e.g. NSF in the quick
    suite), the plan of a model without overrides with the config swapped for ``<configs>/<model>.yaml``."""
    plans = [p for p in suite.runs if p.dataset == dataset and p.seed == suite.seeds[0]]
    plan = next((p for p in plans if p.model == model), None)
    template = next((p for p in plans if not p.reasons), None)
    if plan is None and template is not None and (template.config.parent / f"{model}.yaml").is_file():
        plan = dataclasses.replace(template, model=model, config=template.config.parent / f"{model}.yaml")
    return plan


def row_path(out: Path, plan, recipe: str, ema: str) -> Path:
    return out / f"{plan.dataset}__{plan.model}__{recipe}__{ema.replace(':', '')}__seed{plan.seed}.json"


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["steps"], row["recipe"], row["ema"]), []).append(row)
    columns = [k for k in NUMBERS if any(isinstance(r.get(k), float) for r in rows)]
    lines = ["| model | steps x batch | recipe | EMA | seeds | " + " | ".join(columns) + " | train s |",
             "|" + "---|" * (6 + len(columns))]
    for (model, steps, recipe, ema), group in sorted(groups.items()):
        cells = []
        for k in columns:
            values = [r[k] for r in group if isinstance(r.get(k), float)]
            if not values:
                cells.append("-")
                continue
            spread = f" ± {statistics.pstdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}" if abs(values[0]) < 10 else
                         f"{statistics.mean(values):.1f}{spread}")
        seeds = ",".join(str(r["seed"]) for r in group)
        train = statistics.mean(r["train_seconds"] for r in group)
        lines.append(f"| {model} | {steps} x {group[0]['batch_size']} | {recipe} | {ema} | {seeds} | "
                     + " | ".join(cells) + f" | {train:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="experiments/suites/quick.yaml")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", required=True, help="a model of the suite (its config file's name)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the suite's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recipes", nargs="+", default=["config"])
    parser.add_argument("--emas", nargs="+", default=["none", "decay:0.9999"])
    parser.add_argument("--likelihood-for", nargs="*", default=None,
                        help="score the likelihood only for these EMAs (default: all; it costs as much as sampling "
                             "for the ODE families)")
    parser.add_argument("--out", default="outputs/recipe_sweep")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = load_suite(opts.suite, ROOT)
    wall = time.perf_counter()
    plan = suite_plan(suite, opts.model, opts.dataset)
    if plan is None:
        raise SystemExit(f"{opts.suite} has no model {opts.model!r} on {opts.dataset!r}, and its configs folder "
                         f"no {opts.model}.yaml.")
    for recipe in opts.recipes:
        for seed in opts.seeds:
            train_and_evaluate(opts, suite, dataclasses.replace(plan, seed=seed), recipe, out)
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    report = (f"# Recipe sweep\n\nCommand: `python {' '.join(sys.argv)}` ({time.perf_counter() - wall:.0f} s wall for "
              f"the runs not already in {out}, {platform.processor() or platform.machine()}, {opts.threads} "
              f"thread(s), commit {commit.strip()}).\n\nEvery number comes from the shared evaluator with the suite's "
              f"settings; mean ± population std over the seeds listed.\n\n{table(rows)}\n")
    (out / "recipe_sweep.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
