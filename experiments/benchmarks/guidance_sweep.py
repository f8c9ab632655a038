"""Classifier-free guidance on 8x8 digits: class accuracy and FID vs the guidance weight w, for flow matching
and diffusion.

    python experiments/benchmarks/guidance_sweep.py                          # the committed table (CPU, minutes)
    python experiments/benchmarks/guidance_sweep.py --tiny --out /tmp/guid   # seconds: every stage, a few steps

Both models are trained by ``lightning-flows fit`` (``lightning_flows.training.build_cli``) from their committed
configs, ``experiments/digits/flow_matching_conditional.yaml`` and ``diffusion_conditional.yaml``, at the
configs' own budgets (only run settings are added: no validation, logger or checkpoints; every command line is
printed and written into the table). Each model (EMA weights where the run kept them) is then evaluated by the
shared evaluator (:mod:`lightning_flows.evaluation`) at each w in {0, 1, 2, 4} (``EvaluationSpec.guidance``):
samples drawn for requested classes (equal counts per class), the digits feature classifier's accuracy on
them (1.0 = every requested digit came out as asked; w = 0 is the unconditional model, ~0.1), FID and KID
against the test split, class-conditional FID, NFE and ms per sample. Finally ``lightning-flows sample`` draws
a one-row-per-class grid of each model from its final checkpoint.

Writes ``<out>/guidance_sweep.md``, ``guidance_sweep.png``, ``guidance_sweep.json`` and
``grid_<family>_w<w>.png``. Seeds are fixed (configs' ``seed_everything: 0``, the evaluator's seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import torch  # noqa: E402

from lightning_flows.benchmark.environment import script_environment  # noqa: E402
from lightning_flows.cli import sample_main  # noqa: E402
from lightning_flows.evaluation import EvaluationSpec, Evaluator, sampling_weights  # noqa: E402
from lightning_flows.training import build_cli  # noqa: E402

CONFIGS = {"flow_matching": "experiments/digits/flow_matching_conditional.yaml",
           "diffusion": "experiments/digits/diffusion_conditional.yaml"}


@dataclass(frozen=True)
class Budget:
    """What sizes the run: steps (None: the config's own budget), sample counts, guidance weights."""

    guidances: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    steps: int | None = None
    n_samples: int = 500  # 50 per class
    kid_subsets: int = 50
    grid_guidance: float = 2.0
    grid_per_class: int = 10
    tiny_networks: bool = False  # tiny mode: small UNets and few sampling steps


FULL = Budget()
TINY = Budget(guidances=(0.0, 2.0), steps=3, n_samples=40, kid_subsets=5, grid_per_class=2, tiny_networks=True)
TINY_OVERRIDES = {"flow_matching": ["--model.init_args.sampler.steps", "2"],
                  "diffusion": ["--model.init_args.sample_steps", "2"]}


def say(message: str) -> None:
    print(f"[guidance_sweep] {message}", flush=True)


def fit(family: str, budget: Budget, runs: Path, accelerator: str, commands: list[str]):
    """``lightning-flows fit --config <the family's conditional config>`` plus run settings; the LightningCLI."""
    args = ["fit", "--config", CONFIGS[family], "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_model_summary", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--sample_grid.n", "0",
            "--trainer.accelerator", accelerator, "--trainer.devices", "1",
            "--trainer.default_root_dir", str(runs / family)]
    if budget.steps is not None:
        args += ["--trainer.max_steps", str(budget.steps)]
    if budget.tiny_networks:
        args += ["--model.init_args.base_channels", "8", "--model.init_args.channel_mults", "[1, 2]",
                 *TINY_OVERRIDES[family]]
    command = "lightning-flows " + shlex.join(args)
    say(command)
    commands.append(command)
    return build_cli(args)


def evaluate(cli, budget: Budget, cache_dir: str | None, classifier_weights: str | None) -> tuple[str, list[dict]]:
    """The shared evaluator at every guidance weight, on the weights ``lightning-flows sample`` uses."""
    rows = []
    with sampling_weights(cli.trainer, cli.model) as weights:
        for w in budget.guidances:
            spec = EvaluationSpec(n_samples=budget.n_samples, sample_batch_size=250, likelihood=False, seed=0,
                                  reference_split="test", feature_extractor="classifier",
                                  feature_extractor_weights_path=classifier_weights, kid_subsets=budget.kid_subsets,
                                  guidance=w, extras=False, progress=False, cache_dir=cache_dir)
            start = time.perf_counter()
            result = Evaluator(spec).evaluate(cli.model, cli.datamodule, weights=weights)
            result["eval_seconds"] = time.perf_counter() - start
            say(f"w={w:g}: class accuracy {result['class_accuracy']:.3f}, FID {result['fid']:.2f}, "
                f"class FID {result['class_fid']:.2f} ({result['eval_seconds']:.0f} s)")
            rows.append(result)
    return weights, rows


def draw_grid(cli, family: str, budget: Budget, out: Path, commands: list[str]) -> Path:
    """A one-row-per-class grid through ``lightning-flows sample`` from the run's final checkpoint."""
    checkpoint = Path(cli.trainer.default_root_dir) / "final.ckpt"
    cli.trainer.save_checkpoint(checkpoint, weights_only=False)
    path = out / f"grid_{family}_w{budget.grid_guidance:g}.png"
    # The fits run in the repository root: show paths inside it relative to it, as a user would type them.
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    args = ["--ckpt", str(checkpoint), "--guidance", f"{budget.grid_guidance:g}", "--per-class",
            str(budget.grid_per_class), "--out", str(shown)]
    commands.append("lightning-flows sample " + shlex.join(args))
    sample_main(args)
    return path


def fmt(value, spec: str = "{:.3f}") -> str:
    return "-" if value is None else spec.format(value)


def write_report(out: Path, payload: dict) -> Path:
    env, budget = payload["environment"], payload["budget"]
    lines = ["# Classifier-free guidance on 8x8 digits: class accuracy and FID vs w", "",
             f"Command: `{payload['command']}` ({payload['wall_seconds']:.0f} s wall on {env['device']}, "
             f"{env['threads']} threads, load {env['load_before']:.1f} before / {env['load_after']:.1f} after; "
             f"commit {env['commit']}, {env['date']}). {env['note']}".strip(), "",
             f"Every number comes from the shared evaluator (`lightning_flows.evaluation`): {budget['n_samples']} "
             f"samples per model and w, drawn for requested classes (equal counts per class), features and "
             f"labels from the digits feature classifier; FID/KID against the 180-digit test split (floor: "
             f"the training split at the same n vs the test split). Class accuracy: fraction of samples the "
             f"classifier assigns to the class they were drawn for (w = 0 is the unconditional null-class field, "
             f"so ~0.1 is chance); class FID: per class, the test digits of that class vs the samples drawn for "
             f"it (~18 real digits per class, so it is noisy and biased upwards; compare with its floor).", "",
             "| family | w | class accuracy | FID | KID | class FID | NFE/sample | ms/sample |",
             "|---|---|---|---|---|---|---|---|"]
    for family, result in payload["results"].items():
        for row in result["rows"]:
            cells = [family, f"{row['guidance']:g}", fmt(row["class_accuracy"]), fmt(row["fid"], "{:.2f}"),
                     fmt(row["kid"], "{:.4f}"), fmt(row["class_fid"], "{:.2f}"),
                     fmt(row.get("nfe_per_sample"), "{:.0f}"), fmt(row.get("ms_per_sample"), "{:.2f}")]
            lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(payload["results"].values()))["rows"][0]
    lines += ["", f"Real-data references (same classifier, same splits): accuracy on the test digits "
                  f"{fmt(first['class_accuracy_real'])}; FID floor {fmt(first['fid_floor'], '{:.2f}')}, KID floor "
                  f"{fmt(first['kid_floor'], '{:.4f}')}, class FID floor {fmt(first['class_fid_floor'], '{:.2f}')}.",
              "", "NFE/sample counts network calls per step: a guided step (w not 0 or 1) is ONE call on the doubled "
                  "batch (conditional and null labels), so its ms/sample is up to twice the unguided one.", "",
              "## Runs", ""]
    for family, result in payload["results"].items():
        lines.append(f"- {family}: {result['steps']} optimizer steps in {result['fit_seconds']:.0f} s "
                     f"(weights: {result['weights']}); grid `{Path(result['grid']).name}`")
    lines += ["", "Commands:", "", *[f"    {c}" for c in payload["commands"]], ""]
    path = out / "guidance_sweep.md"
    path.write_text("\n".join(lines))
    return path


def write_figure(out: Path, payload: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("class_accuracy", None, "class accuracy (feature classifier)"), ("fid", "fid_floor", "FID (classifier)"),
              ("class_fid", "class_fid_floor", "class-conditional FID"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, floor_key, title) in zip(axes[0], panels):
        for family, result in payload["results"].items():
            rows = result["rows"]
            ax.plot([r["guidance"] for r in rows], [r[key] for r in rows], "-o", markersize=4, label=family)
        first = next(iter(payload["results"].values()))["rows"][0]
        if floor_key:
            ax.axhline(first[floor_key], color="black", linewidth=1, linestyle=":", label="real-vs-real floor")
        else:
            ax.axhline(first["class_accuracy_real"], color="black", linewidth=1, linestyle=":",
                       label="real test digits")
            ax.axhline(0.1, color="grey", linewidth=1, linestyle="--", label="chance")
            ax.set_ylim(0, 1.05)
        ax.set_xlabel("guidance w")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "guidance_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default: experiments/results/guidance")
    parser.add_argument("--runs", default=None, help="run directories and final checkpoints; default: "
                                                     "runs/guidance_sweep")
    parser.add_argument("--tiny", action="store_true", help="a few steps, small networks, w in {0, 2}")
    parser.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--cache-dir", default=None, help="evaluator cache (classifier, features)")
    parser.add_argument("--classifier-weights", default=None, help="digits feature classifier state dict")
    parser.add_argument("--note", default="", help="text for the table header (e.g. machine contended)")
    opts = parser.parse_args(argv)
    budget = TINY if opts.tiny else FULL
    torch.set_num_threads(opts.threads)
    out = Path(opts.out).resolve() if opts.out else ROOT / "experiments" / "results" / "guidance"
    runs = Path(opts.runs).resolve() if opts.runs else Path("runs") / "guidance_sweep"
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/benchmarks/guidance_sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = script_environment(ROOT, opts.accelerator, opts.threads, opts.note)
    say(f"budget: {asdict(budget)}")
    started = time.perf_counter()
    commands: list[str] = []
    results = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # the configs' relative paths
    try:
        for family in opts.families:
            start = time.perf_counter()
            cli = fit(family, budget, runs, opts.accelerator, commands)
            fit_seconds = time.perf_counter() - start
            weights, rows = evaluate(cli, budget, opts.cache_dir, opts.classifier_weights)
            grid = draw_grid(cli, family, budget, out, commands)
            results[family] = {"config": CONFIGS[family], "steps": cli.trainer.global_step, "fit_seconds": fit_seconds,
                               "weights": weights, "rows": rows, "grid": str(grid)}
    finally:
        os.chdir(cwd)
    env["load_after"] = os.getloadavg()[0]
    payload = {"command": command.strip(), "budget": asdict(budget), "environment": env, "results": results,
               "commands": commands, "wall_seconds": time.perf_counter() - started}
    (out / "guidance_sweep.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    table = write_report(out, payload)
    figure = write_figure(out, payload)
    say(f"wrote {table}, {figure} and {out / 'guidance_sweep.json'} in {payload['wall_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
