"""Flow matching: sample quality vs NFE for the independent, minibatch-OT and reflow couplings, and MeanFlow.

    python experiments/benchmarks/nfe_sweep.py                      # the committed table (CPU)
    python experiments/benchmarks/nfe_sweep.py --tiny --out /tmp/nfe  # seconds: every stage, a few steps

Every model is trained by ``lightning-flows fit`` (``lightning_flows.training.build_cli``) from a committed
config with explicit overrides, all printed and written into the table:

* toy densities (``8gaussians``, ``checkerboard``): ``experiments/toy2d/flow_matching.yaml`` (independent),
  ``flow_matching_ot.yaml`` (OT), ``flow_matching_reflow.yaml`` (reflow, teacher = the independent run);
* 8x8 digits: ``experiments/digits/flow_matching.yaml`` with the coupling switched by
  ``--model.init_args.coupling ot|reflow`` (reflow's teacher = the independent digits run);
* MeanFlow (one-step flow matching without a teacher, issue 23): ``experiments/{toy2d,digits}/meanflow.yaml``.

Each model is then sampled with Euler at k steps (NFE = k, the primary axis) and with midpoint at k / 2
steps (a second-order sampler at the same NFE), for k in {1, 2, 4, 8, 16, 32, 100}; MeanFlow takes k jumps of
its average velocity u(z, r, t) on a uniform grid (NFE = k; ``lightning_flows.models.meanflow.sampling_steps``,
the knob ``lightning-flows sample`` turns with ``sampling.steps``). Every number comes
from the shared evaluator (``lightning_flows.evaluation``): energy distance to held-out points beside the
real-vs-real floor (toy), FID / KID with classifier features beside their floors (digits), NFE per sample,
and the straightness of the sampling ODE's paths (not MeanFlow's: it jumps, it does not integrate an ODE).
Training steps/s of every model are measured with the
data pipeline included (``TrainingTimer.loop_seconds``: the OT pairing is part of the cost) in short fits
interleaved round-robin, in a rotating order, so that load drifts hit every coupling alike.

The run is sized in optimizer steps (``--tiny`` only shrinks them). Seeds are fixed (configs'
``seed_everything: 0``, the evaluator's seed 0) and numbers are deterministic at a fixed thread count.
Writes ``<out>/nfe_sweep.md``, ``nfe_sweep.png`` and ``nfe_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import torch  # noqa: E402

from lightning_flows.benchmark.environment import script_environment  # noqa: E402
from lightning_flows.callbacks import TrainingTimer  # noqa: E402
from lightning_flows.evaluation import EvaluationSpec, Evaluator, sampling_weights  # noqa: E402
from lightning_flows.models import MeanFlow  # noqa: E402
from lightning_flows.models.meanflow import sampling_steps  # noqa: E402
from lightning_flows.ode import SolverConfig  # noqa: E402
from lightning_flows.training import build_cli  # noqa: E402

COUPLINGS = ("independent", "ot", "reflow")
TOY_CONFIGS = {"independent": "experiments/toy2d/flow_matching.yaml", "ot": "experiments/toy2d/flow_matching_ot.yaml",
               "reflow": "experiments/toy2d/flow_matching_reflow.yaml"}
DIGITS_CONFIG = "experiments/digits/flow_matching.yaml"
MEANFLOW = "meanflow"
MEANFLOW_CONFIGS = {"toy": "experiments/toy2d/meanflow.yaml", "digits": "experiments/digits/meanflow.yaml"}
MODELS = (*COUPLINGS, MEANFLOW)
SAMPLERS = ("euler", "midpoint")
JUMPS = "jumps"  # MeanFlow's sampler: k jumps of the average velocity, NFE = k


def samplers_of(model: str) -> tuple[str, ...]:
    return (JUMPS,) if model == MEANFLOW else SAMPLERS
# Throughput variants: the couplings, plus (toy) OT paired inside the training step, the peers' way.
INLINE_OT = "ot, pairing in the step"


@dataclass(frozen=True)
class Budget:
    """Everything that sizes the run (optimizer steps and sample counts, never wall time)."""

    toy_datasets: tuple[str, ...] = ("8gaussians", "checkerboard")
    nfes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 100)
    toy_steps: int = 3000
    digits_steps: int = 480  # the digits config's 40 epochs of 12 batches
    toy_samples: int = 3000
    digits_samples: int = 500
    kid_subsets: int = 50
    toy_reflow_pairs: int | None = None  # None: the reflow config's (20,000 pairs, midpoint x 50)
    toy_reflow_solver_steps: int | None = None
    digits_reflow_pairs: int = 4000
    digits_reflow_solver_steps: int = 20  # midpoint steps of the teacher's ODE: 40 NFE per pair
    straightness_paths_toy: int = 2000
    straightness_paths_digits: int = 128
    straightness_steps: int = 50
    throughput_rounds: int = 3
    throughput_steps_toy: int = 200
    throughput_steps_digits: int = 30
    # Throughput fits only: reflow's pairs (how many, how accurate) do not change the cost of a training step.
    throughput_reflow_pairs: int = 512
    digits: bool = True


FULL = Budget()
TINY = Budget(toy_datasets=("8gaussians",), nfes=(1, 2), toy_steps=4, digits_steps=3, toy_samples=200,
              digits_samples=64, kid_subsets=5, toy_reflow_pairs=256, toy_reflow_solver_steps=2,
              digits_reflow_pairs=64, digits_reflow_solver_steps=2, straightness_paths_toy=64,
              straightness_paths_digits=16, straightness_steps=4, throughput_rounds=1, throughput_steps_toy=4,
              throughput_steps_digits=3, throughput_reflow_pairs=64)


def say(message: str) -> None:
    print(f"[nfe_sweep] {message}", flush=True)


def solver_for(method: str, nfe: int) -> SolverConfig | None:
    """The fixed-step sampler with exactly ``nfe`` evaluations (None: midpoint cannot do an odd NFE)."""
    if method == "euler":
        return SolverConfig("euler", steps=nfe, max_nfe=nfe)
    if nfe % 2:
        return None
    return SolverConfig("midpoint", steps=nfe // 2, max_nfe=nfe)


# ---- training through the public CLI ----
class Runner:
    """Trains through ``build_cli`` with the run-wide overrides, and keeps every command line it ran."""

    def __init__(self, runs: Path, accelerator: str):
        self.runs, self.accelerator = runs, accelerator
        self.commands: list[str] = []

    def fit(self, name: str, config: str, overrides: list[str], checkpoint: bool = True):
        """``lightning-flows fit --config <config> <run-wide overrides> <overrides>``; returns the LightningCLI."""
        run_wide = ["--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
                    "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
                    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                    "--trainer.accelerator", self.accelerator, "--trainer.devices", "1",
                    "--trainer.default_root_dir", str(self.runs / name),
                    "--trainer.callbacks+=lightning_flows.callbacks.TrainingTimer"]
        if not checkpoint:
            run_wide += ["--trainer.enable_checkpointing", "false"]
        args = ["fit", "--config", config, *run_wide, *overrides]
        command = "lightning-flows " + shlex.join(args)
        say(command)
        self.commands.append(command)
        return build_cli(args)


def timer_of(trainer) -> TrainingTimer:
    return next(c for c in trainer.callbacks if isinstance(c, TrainingTimer))


def loop_rate(trainer) -> float:
    """Steps/s with the data pipeline included (batch start to batch start within epochs)."""
    timer = timer_of(trainer)
    return timer.loop_batches / timer.loop_seconds if timer.loop_seconds > 0 else float("nan")


def final_checkpoint(trainer) -> str:
    """The run's final weights as a Lightning checkpoint (``max_steps`` ends mid-epoch, after the last epoch-end
    checkpoint), the teacher reflow loads through ``teacher_ckpt``."""
    path = Path(trainer.default_root_dir) / "checkpoints" / f"final-step={trainer.global_step}.ckpt"
    trainer.save_checkpoint(path, weights_only=False)
    return str(path)


def coupling_overrides(dataset: str, coupling: str, budget: Budget, teacher: str | None,
                       throughput: bool = False) -> tuple[str, list[str]]:
    """(config, overrides) of one model: the toy configs as committed (dataset switched), digits' config
    with the coupling switched; reflow gets its teacher (and, where the budget says, fewer pairs); MeanFlow its
    own configs as committed."""
    if coupling == MEANFLOW:
        if dataset == "digits":
            return MEANFLOW_CONFIGS["digits"], []
        return MEANFLOW_CONFIGS["toy"], ["--data.dataset", dataset]
    inline = coupling == INLINE_OT
    coupling = "ot" if inline else coupling
    if dataset == "digits":
        config, overrides = DIGITS_CONFIG, []
        if coupling != "independent":
            overrides += ["--model.init_args.coupling", coupling]
        pairs, solver_steps = budget.digits_reflow_pairs, budget.digits_reflow_solver_steps
    else:
        config, overrides = TOY_CONFIGS[coupling], ["--data.dataset", dataset]
        pairs, solver_steps = budget.toy_reflow_pairs, budget.toy_reflow_solver_steps
    if inline:
        overrides += ["--model.init_args.pairing_threads", "0"]
    if coupling == "reflow":
        overrides += ["--model.init_args.teacher_ckpt", str(teacher)]
        if throughput:
            pairs, solver_steps = budget.throughput_reflow_pairs, 1
        if pairs is not None:
            overrides += ["--model.init_args.reflow_pairs", str(pairs)]
        if solver_steps is not None:
            overrides += ["--model.init_args.reflow_solver", json.dumps({"method": "midpoint", "steps": solver_steps})]
    return config, overrides


# ---- evaluation through the shared evaluator ----
def quality_spec(dataset: str, budget: Budget, cache_dir: str | None, weights_path: str | None) -> EvaluationSpec:
    common = dict(likelihood=False, quality=True, timing=True, extras=False, progress=False, seed=0,
                  cache_dir=cache_dir)
    if dataset == "digits":
        return EvaluationSpec(n_samples=budget.digits_samples, sample_batch_size=250, reference_split="test",
                              feature_extractor="classifier", feature_extractor_weights_path=weights_path,
                              kid_subsets=budget.kid_subsets, **common)
    return EvaluationSpec(n_samples=budget.toy_samples, sample_batch_size=1000, reference_split="test", **common)


def straightness_spec(dataset: str, budget: Budget) -> EvaluationSpec:
    paths = budget.straightness_paths_digits if dataset == "digits" else budget.straightness_paths_toy
    return EvaluationSpec(likelihood=False, quality=False, timing=False, extras=False, progress=False, seed=0,
                          sample_batch_size=250 if dataset == "digits" else 1000, straightness_paths=paths,
                          straightness_steps=budget.straightness_steps)


def check_nfe(method: str, nfe: int, result: dict) -> None:
    if result.get("nfe_per_sample") != nfe:
        raise RuntimeError(f"{method} at {nfe} NFE reported {result.get('nfe_per_sample')} NFE/sample")


def sweep(cli, quality: Evaluator, nfes: tuple[int, ...], straightness: EvaluationSpec) -> dict:
    """Evaluate one trained model at every sampler and NFE, and its paths' straightness (ODE samplers only)."""
    model, trainer, datamodule = cli.model, cli.trainer, cli.datamodule
    if isinstance(model, MeanFlow):
        rows = []
        with sampling_weights(trainer, model) as weights:
            for nfe in nfes:
                with sampling_steps(model, nfe):
                    result = quality.evaluate(model, datamodule, weights=weights)
                check_nfe(JUMPS, nfe, result)
                rows.append({"method": JUMPS, "steps": nfe, "nfe": nfe, **result})
        return {"weights": weights, "sweep": rows, "straightness": None, "straightness_rel": None,
                "straightness_paths": None}
    original, rows = model.sampler, []
    with sampling_weights(trainer, model) as weights:
        try:
            for method in SAMPLERS:
                for nfe in nfes:
                    solver = solver_for(method, nfe)
                    if solver is None:
                        continue
                    model.sampler = solver
                    result = quality.evaluate(model, datamodule, weights=weights)
                    check_nfe(method, nfe, result)
                    rows.append({"method": method, "steps": solver.steps, "nfe": nfe, **result})
        finally:
            model.sampler = original
        paths = Evaluator(straightness).evaluate(model, datamodule, weights=weights)
    return {"weights": weights, "sweep": rows, "straightness": paths.get("straightness"),
            "straightness_rel": paths.get("straightness_rel"), "straightness_paths": paths.get("straightness_paths")}


# ---- the stages ----
def quality_stage(dataset: str, budget: Budget, runner: Runner, quality: Evaluator) -> tuple[dict, str]:
    """Train independent, OT, reflow and MeanFlow on ``dataset`` and sweep each; returns (results, teacher
    checkpoint)."""
    steps = budget.digits_steps if dataset == "digits" else budget.toy_steps
    results, teacher = {}, None
    for coupling in MODELS:
        config, overrides = coupling_overrides(dataset, coupling, budget, teacher)
        start = time.perf_counter()
        cli = runner.fit(f"{dataset}_{coupling}", config, overrides + ["--trainer.max_steps", str(steps)])
        fit_seconds = time.perf_counter() - start
        if coupling == "independent":
            teacher = final_checkpoint(cli.trainer)
        start = time.perf_counter()
        result = sweep(cli, quality, budget.nfes, straightness_spec(dataset, budget))
        result.update(config=config, overrides=overrides, steps=cli.trainer.global_step,
                      fit_seconds=fit_seconds, eval_seconds=time.perf_counter() - start,
                      fit_steps_per_second=loop_rate(cli.trainer), command=runner.commands[-1])
        results[coupling] = result
        best = min(r[quality_key(dataset)] for r in result["sweep"])
        paths = ("" if result["straightness"] is None else
                 f"; straightness {result['straightness']:.4g} (S/K {result['straightness_rel']:.3f})")
        say(f"{dataset}/{coupling}: {result['steps']} steps in {fit_seconds:.0f} s; best {quality_key(dataset)} "
            f"{best:.4g}{paths}")
    return results, teacher


def throughput_stage(dataset: str, budget: Budget, runner: Runner, teacher: str) -> dict:
    """Steps/s of every model in short fits, round-robin over ``throughput_rounds`` rounds, the order rotated
    each round. Returns ``{variant: {"rates": [...], "ratios": [...]}}`` (ratios to independent, per round)."""
    variants = list(MODELS) + ([INLINE_OT] if dataset != "digits" else [])
    steps = budget.throughput_steps_digits if dataset == "digits" else budget.throughput_steps_toy
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(budget.throughput_rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            config, overrides = coupling_overrides(dataset, variant, budget, teacher, throughput=True)
            cli = runner.fit(f"throughput_{dataset}", config, overrides + ["--trainer.max_steps", str(steps)],
                             checkpoint=False)
            rates[variant].append(loop_rate(cli.trainer))
    return {v: {"rates": rates[v], "ratios": [a / b for a, b in zip(rates[v], rates["independent"])]}
            for v in variants}


# ---- report ----
def quality_key(dataset: str) -> str:
    return "fid" if dataset == "digits" else "energy_distance"


def lookup(result: dict, method: str, nfe: int, key: str) -> float | None:
    row = next((r for r in result["sweep"] if r["method"] == method and r["nfe"] == nfe), None)
    return None if row is None else row[key]


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def first_reaching(result: dict, method: str, key: str, target: float, nfes) -> int | None:
    """Smallest NFE at which ``method`` is at least as good (<=) as ``target``."""
    return next((n for n in nfes if (v := lookup(result, method, n, key)) is not None and v <= target), None)


def quality_table(results: dict, nfes, key: str) -> list[str]:
    lines = ["| model | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for coupling in MODELS:
        for method in samplers_of(coupling):
            lines.append(f"| {coupling} | {method} | "
                         + " | ".join(fmt(lookup(results[coupling], method, n, key)) for n in nfes) + " |")
    return lines


def best_of(result: dict, key: str) -> tuple[float, str, int]:
    """(value, sampler, NFE) of the best entry of one model's sweep."""
    value, nfe, method = min((r[key], r["nfe"], r["method"]) for r in result["sweep"])
    return value, method, nfe


def reach_text(result: dict, key: str, target: float, nfes, samplers=SAMPLERS) -> str:
    parts = []
    for method in samplers:
        reach = first_reaching(result, method, key, target, nfes)
        parts.append(f"{method} {reach} NFE" if reach else f"{method} never (<= {max(nfes)} NFE)")
    return ", ".join(parts)


def summary_lines(results: dict, nfes, key: str, floor: float) -> list[str]:
    """Where OT and reflow reach the independent coupling's 100-NFE Euler value and its best value."""
    top = max(nfes)
    target = lookup(results["independent"], "euler", top, key)
    best, best_method, best_nfe = best_of(results["independent"], key)
    lines = [f"- Independent coupling: Euler at {top} NFE {fmt(target)}; its best {fmt(best)} ({best_method}, "
             f"{best_nfe} NFE); floor {fmt(floor)}."]
    for coupling in ("ot", "reflow"):
        value, method, nfe = best_of(results[coupling], key)
        reach_target = reach_text(results[coupling], key, target, nfes)
        lines.append(f"- {coupling}: reaches independent's Euler-{top} value with {reach_target}; "
                     f"independent's best value with {reach_text(results[coupling], key, best, nfes)}. Euler at 1 NFE "
                     f"{fmt(lookup(results[coupling], 'euler', 1, key))}, at {top} NFE "
                     f"{fmt(lookup(results[coupling], 'euler', top, key))}; best {fmt(value)} ({method}, {nfe} NFE).")
    meanflow = results[MEANFLOW]
    one, two = lookup(meanflow, JUMPS, 1, key), lookup(meanflow, JUMPS, 2, key)
    reflow_one = lookup(results["reflow"], "euler", 1, key)
    value, _, nfe = best_of(meanflow, key)
    relative = "" if not target else f" ({100 * (one / target - 1):+.0f}% against independent's Euler-{top})"
    lines.append(f"- meanflow (no teacher): 1 NFE {fmt(one)}{relative}, 2 NFE {fmt(two)}; reflow's 1-NFE Euler "
                 f"{fmt(reflow_one)}; reaches independent's Euler-{top} value with "
                 f"{reach_text(meanflow, key, target, nfes, (JUMPS,))}; best {fmt(value)} ({nfe} NFE).")
    return lines


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_report(out: Path, payload: dict, budget: Budget) -> Path:
    nfes, env = budget.nfes, payload["environment"]
    lines = ["# Flow matching: sample quality vs NFE for independent, minibatch-OT and reflow couplings, and MeanFlow",
             "",
             f"Produced by `{payload['command']}` in {payload['wall_seconds']:.0f} s on {env['device']} "
             f"({env['threads']} torch thread(s), {env['cpu_count']} cores), torch {env['versions']['torch']}, "
             f"commit {env['commit']}, {env['date']}. Load average (1 min) before the run: "
             f"{env['load_before']:.1f}, after: {env['load_after']:.1f}. {env['note']}".rstrip(), "",
             "Every number comes from the shared evaluator (`lightning_flows.evaluation`), on the weights "
             "`lightning-flows sample` uses, with the same noise for every sampler. NFE = network evaluations per "
             "sample: Euler with k steps (NFE = k, the primary axis) and midpoint with k/2 steps (NFE = k; no odd "
             "NFE); MeanFlow with k jumps of its average velocity (NFE = k). Lower is better; the floor is the "
             "same metric between two real data sets of the same size, "
             "what a perfect model scores (energy distance and KID are unbiased estimates, so values near 0 can be "
             "negative). Figure: `nfe_sweep.png`; the training commands are at the end.", ""]
    for dataset, results in payload["quality"].items():
        first = results["independent"]["sweep"][0]
        if dataset == "digits":
            lines += [f"## {dataset}: FID, classifier features ({first['n_quality']} samples vs the "
                      f"{first['n_reference']} test digits; floor {fmt(first['fid_floor'])}: {first['n_floor']} "
                      f"real digits of the {first.get('floor_split', 'train')} set)", ""]
            lines += quality_table(results, nfes, "fid") + [""]
            lines += summary_lines(results, nfes, "fid", first["fid_floor"]) + [""]
            stds = [r["kid_std"] for res in results.values() for r in res["sweep"]]
            lines += [f"## {dataset}: KID, same features and samples (floor {fmt(first['kid_floor'])}; std over "
                      f"{budget.kid_subsets} subsets {fmt(min(stds), 2)}-{fmt(max(stds), 2)})", ""]
            lines += quality_table(results, nfes, "kid") + [""]
        else:
            lines += [f"## {dataset}: energy distance ({first['n_quality']} samples vs {first['n_reference']} "
                      f"held-out test points; floor {fmt(first['energy_distance_floor'])}: as many training "
                      f"points)", ""]
            lines += quality_table(results, nfes, "energy_distance") + [""]
            lines += summary_lines(results, nfes, "energy_distance", first["energy_distance_floor"]) + [""]
    lines += ["## Training throughput", "",
              "Optimizer steps per second with the data pipeline included (`TrainingTimer.loop_seconds`: batch "
              "start to batch start, so the OT pairing counts whether it runs in the background thread or in the "
              f"step). Interleaved: short fits round-robin over {budget.throughput_rounds} rounds in a rotating "
              f"order ({budget.throughput_steps_toy} steps per 2D fit, {budget.throughput_steps_digits} per digits "
              "fit; the median, and the median of the per-round ratios). In the quality fit: the same clock over "
              "that model's whole training (sequential, so load changes between fits are in it).", "",
              "| data | model | steps/s interleaved | vs independent | steps/s in the quality fit |",
              "|---|---|---|---|---|"]
    for dataset, speed in payload["throughput"].items():
        results = payload["quality"][dataset]
        for variant, measured in speed.items():
            fit_rate = results[variant]["fit_steps_per_second"] if variant in results else None
            lines.append(f"| {dataset} | {variant} | {fmt(median(measured['rates']), 3)} | "
                         f"{fmt(median(measured['ratios']), 2)} | {fmt(fit_rate, 3)} |")
    lines += ["", "## Path straightness", "",
              "Liu et al.'s S = E int_0^1 ||(x1 - x0) - v(x_t, t)||^2 dt along the sampling ODE's paths from noise "
              f"(`lightning_flows.metrics.path_straightness`; midpoint, {budget.straightness_steps} steps; "
              f"{budget.straightness_paths_toy} paths on 2D data, {budget.straightness_paths_digits} on digits): "
              "0 for straight constant-speed paths, which one Euler step integrates exactly. S/K divides by the "
              "paths' kinetic energy E int ||v||^2 dt (scale-free, in [0, 1]). MeanFlow samples by jumps, not by an "
              "ODE, so it has no row here.", "",
              "| data | coupling | S | S/K |", "|---|---|---|---|"]
    for dataset, results in payload["quality"].items():
        for coupling in COUPLINGS:
            res = results[coupling]
            lines.append(f"| {dataset} | {coupling} | {fmt(res['straightness'])} | {fmt(res['straightness_rel'], 3)} |")
    lines += ["", "## Training runs", "",
              "Every fit is `lightning-flows fit --config <config>` plus the run-wide overrides `--trainer.max_epochs "
              "-1 --trainer.limit_val_batches 0 --trainer.num_sanity_val_steps 0` (no validation passes), no logger, "
              "no progress bar, one device, `--trainer.callbacks+=lightning_flows.callbacks.TrainingTimer`, and:", ""]
    for dataset, results in payload["quality"].items():
        for coupling in MODELS:
            res = results[coupling]
            overrides = " ".join(shlex.quote(a) for a in res["overrides"]) or "(no overrides)"
            lines.append(f"- {dataset}/{coupling}: `{res['config']}` for {res['steps']} steps, `{overrides}` "
                         f"({res['fit_seconds']:.0f} s fit, {res['eval_seconds']:.0f} s evaluation)")
    lines += ["", "Reflow's teacher is the final checkpoint of the independent run on the same data. Throughput fits "
              f"train reflow on {budget.throughput_reflow_pairs} pairs from a one-step teacher solve (a step's cost "
              "does not depend on the pairs). Every command line, in order: `nfe_sweep.json` (`commands`)."]
    path = out / "nfe_sweep.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_figure(out: Path, payload: dict, budget: Budget) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, "energy_distance", "energy_distance_floor", "energy distance") for d in payload["quality"]
              if d != "digits"]
    if "digits" in payload["quality"]:
        panels += [("digits", "fid", "fid_floor", "FID (classifier)"), ("digits", "kid", "kid_floor", "KID")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.1), squeeze=False)
    colours = {"independent": "tab:blue", "ot": "tab:orange", "reflow": "tab:green", MEANFLOW: "tab:red"}
    for ax, (dataset, key, floor_key, label) in zip(axes[0], panels):
        results = payload["quality"][dataset]
        for coupling in MODELS:
            for method, style in zip(samplers_of(coupling), ("-o", "--s")):
                rows = [r for r in results[coupling]["sweep"] if r["method"] == method]
                ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], style, color=colours[coupling],
                        markersize=4, label=f"{coupling}, {method}")
        floor = results["independent"]["sweep"][0][floor_key]
        ax.axhline(floor, color="black", linewidth=1, linestyle=":", label="real-vs-real floor")
        ax.set_xscale("log")
        if key == "fid":
            ax.set_yscale("log")
        else:  # unbiased estimates: values near the floor may be negative; linear within the floor's scale
            ax.set_yscale("symlog", linthresh=1e-3 if key == "energy_distance" else max(abs(floor), 1e-6))
        ax.set_xticks(list(budget.nfes), [str(n) for n in budget.nfes])
        ax.set_xlabel("NFE per sample")
        ax.set_title(f"{dataset}: {label}")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "nfe_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default: experiments/results/nfe")
    parser.add_argument("--runs", default=None, help="checkpoints (reflow teachers); default: runs/nfe_sweep")
    parser.add_argument("--tiny", action="store_true", help="a few steps, NFE 1 and 2, one toy density")
    parser.add_argument("--no-digits", action="store_true", help="skip the digits models")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="evaluator cache (classifier, features)")
    parser.add_argument("--classifier-weights", default=None, help="digits feature classifier state dict")
    parser.add_argument("--note", default="", help="text for the table header (e.g. machine contended)")
    opts = parser.parse_args(argv)
    budget = TINY if opts.tiny else FULL
    if opts.no_digits:
        budget = replace(budget, digits=False)
    torch.set_num_threads(opts.threads)
    # Defaults are relative to the repository (where the fits run, so the printed commands stay short).
    out = Path(opts.out).resolve() if opts.out else ROOT / "experiments" / "results" / "nfe"
    runs = Path(opts.runs).resolve() if opts.runs else Path("runs") / "nfe_sweep"
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/benchmarks/nfe_sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = script_environment(ROOT, opts.accelerator, opts.threads, opts.note)
    say(f"budget: {asdict(budget)}")
    started = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs' relative paths
    try:
        runner = Runner(runs, opts.accelerator)
        datasets = list(budget.toy_datasets) + (["digits"] if budget.digits else [])
        quality, throughput = {}, {}
        for dataset in datasets:
            evaluator = Evaluator(quality_spec(dataset, budget, opts.cache_dir, opts.classifier_weights))
            quality[dataset], teacher = quality_stage(dataset, budget, runner, evaluator)
            if dataset in (datasets[0], "digits"):  # a step costs the same on every 2D density
                throughput[dataset] = throughput_stage(dataset, budget, runner, teacher)
    finally:
        os.chdir(cwd)
    env["load_after"] = os.getloadavg()[0]
    payload = {"command": command.strip(), "budget": asdict(budget), "environment": env, "quality": quality,
               "throughput": throughput, "commands": runner.commands,
               "wall_seconds": time.perf_counter() - started}
    (out / "nfe_sweep.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    table = write_report(out, payload, budget)
    figure = write_figure(out, payload, budget)
    say(f"wrote {table}, {figure} and {out / 'nfe_sweep.json'} in {payload['wall_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
