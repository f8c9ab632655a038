"""What the framework costs per training step: a hand-written PyTorch loop vs ``lightning-flows fit``.

    python experiments/benchmarks/overhead.py                       # every case, 5 rounds
    python experiments/benchmarks/overhead.py --cases toy2d_fm --rounds 7 --steps 400
    python experiments/benchmarks/overhead.py --profile toy2d_fm    # cProfile of the Lightning run

For each case the same model (built from the committed config, so the same seed and initial weights),
the same data and batch size train for ``warmup + steps`` optimizer steps in two ways:

(a) **hand loop**: a minimal PyTorch loop a user would write: shuffle the in-memory training tensor
    each epoch, slice a batch, dequantise it, compute the loss by hand (flow matching: draw ``x0``, ``t``,
    regress ``x1 - x0``; RealNVP: ``-log p(x) / D`` through the flow), ``zero_grad``, ``backward``, gradient
    clipping when the config clips, ``Adam.step``. No logging, no checks.
(b) **lightning-flows fit**: ``lightning_flows.training.build_cli(["--config", ...], run=False)`` with
    everything a user gets by default: the TQDM progress bar (redirected to /dev/null), the CSV logger
    from the config, model checkpointing, the sample-grid callback, the non-finite guard and the
    evaluation callback (inactive while fitting); then ``cli.trainer.fit(cli.model, datamodule=cli.datamodule)``
    is called, which is exactly what the
    ``fit`` subcommand runs, with one extra callback that timestamps the end of every training batch.

Only the overrides needed to time steps alone are passed: ``max_steps``, a CPU device, output in a
temporary directory, no sanity-check validation and validation beyond the timed window (validation and
sample grids are separate, equal costs: a hand loop that validates pays them too).

Timing: steps/s over the ``steps`` steps after ``warmup`` steps, from the end of the warm-up's last step
to the end of the final one, so everything between steps (data, hooks, logging) counts, on two clocks:
the process's CPU time (all its threads; on a shared, busy machine other processes cannot inflate it,
and with one intra-op thread it equals wall time on a quiet one) and wall-clock time. Each round runs
the variants back to back, rotating which goes first; the script reports the medians over rounds and the
median of the per-round ratios to the hand loop. ``--bare`` adds (c): the hand loop's loss and data in a
LightningModule that logs nothing, under a Trainer with no logger, checkpointing, progress bar or summary:
what Lightning's loop itself costs. One intra-op thread by default.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import os
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_flows.training import build_cli  # noqa: E402


@dataclass(frozen=True)
class Case:
    config: str
    kind: str  # "flow_matching" or "exact_flow": what the hand loop computes
    steps: int  # timed steps per run
    warmup: int


CASES = {
    "toy2d_fm": Case("experiments/toy2d/flow_matching.yaml", "flow_matching", steps=400, warmup=30),
    "digits_fm": Case("experiments/digits/flow_matching.yaml", "flow_matching", steps=60, warmup=8),
    "toy2d_realnvp": Case("experiments/toy2d/realnvp.yaml", "exact_flow", steps=400, warmup=30),
    "digits_realnvp": Case("experiments/digits/realnvp.yaml", "exact_flow", steps=150, warmup=15),
}


CLOCKS = ("cpu", "wall")


def stamp() -> tuple[float, float]:
    """(this process's CPU seconds, all threads; wall-clock seconds)."""
    return time.process_time(), time.perf_counter()


class StepClock(L.Callback):
    """:func:`stamp` at the end of every training batch."""

    def __init__(self):
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(stamp())


def steps_per_second(stamps: list[tuple[float, float]], warmup: int) -> dict[str, float]:
    """Rates over the stamps after the first ``warmup`` (stamp ``warmup - 1`` is the clock's start), per
    clock: ``cpu`` (steps per CPU-second of this process: what other processes on a shared machine cannot
    inflate) and ``wall``."""
    timed = stamps[warmup - 1:]
    return {clock: (len(timed) - 1) / (timed[-1][i] - timed[0][i]) for i, clock in enumerate(CLOCKS)}


def cli_args(case: Case, workdir: str, *extra: str) -> list[str]:
    # No "fit": with run=False LightningCLI parses the subcommand's arguments without the subcommand.
    return ["--config", str(ROOT / case.config), "--trainer.max_steps", str(case.warmup + case.steps),
            "--trainer.max_epochs", "-1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.default_root_dir", workdir, "--trainer.logger.init_args.save_dir", workdir,
            "--trainer.num_sanity_val_steps", "0", "--trainer.check_val_every_n_epoch", "100000", *extra]


def build(case: Case, workdir: str, *extra: str):
    """The CLI objects of ``case`` (model, datamodule, trainer), quietly."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return build_cli(cli_args(case, workdir, *extra), run=False)


def run_lightning(case: Case, *extra: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as workdir:
        cli = build(case, workdir, *extra)
        clock = StepClock()
        cli.trainer.callbacks.append(clock)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), \
                contextlib.redirect_stdout(devnull):
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if len(clock.stamps) != case.warmup + case.steps:
            raise RuntimeError(f"expected {case.warmup + case.steps} training steps, timed {len(clock.stamps)}")
        return steps_per_second(clock.stamps, case.warmup)


def hand_loss(case: Case, model):
    """The loss a user writes by hand for ``case`` (the model's network, not its training_step)."""
    if case.kind == "flow_matching":
        net = model.velocity

        def loss(x1):
            x0 = torch.randn_like(x1)
            t = torch.rand(x1.shape[0])
            tb = t.view(-1, *[1] * (x1.ndim - 1))
            xt = (1 - tb) * x0 + tb * x1
            return (net(xt, t) - (x1 - x0)).pow(2).mean()
        return loss
    flow, dim = model.flow, model.dim
    return lambda x: -flow.log_prob(x).mean() / dim


class HandBatches:
    """The hand loop's data: reshuffle the in-memory tensor every epoch, slice, dequantise."""

    def __init__(self, data: torch.Tensor, batch: int, levels: int | None):
        self.data, self.batch, self.levels = data, batch, levels

    def __len__(self) -> int:
        return len(self.data) // self.batch

    def __iter__(self):
        order = torch.randperm(len(self.data))
        for i in range(len(self)):
            x = self.data[order[i * self.batch:(i + 1) * self.batch]]
            if self.levels is not None:  # uniform dequantisation to [-1, 1)
                x = 2.0 * (x.float() + torch.rand(x.shape)) / self.levels - 1.0
            yield x


def hand_setup(case: Case):
    """The same seeded model and data as the Lightning run, with the hand-written loss and data."""
    with tempfile.TemporaryDirectory() as workdir:
        cli = build(case, workdir)
    model, dm = cli.model.train(), cli.datamodule
    dm.setup("fit")
    return model, HandBatches(dm.splits.train, dm.batch_size, dm.levels), hand_loss(case, model), \
        cli.trainer.gradient_clip_val


def run_hand_loop(case: Case) -> dict[str, float]:
    model, batches, loss_fn, clip = hand_setup(case)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=model.lr, weight_decay=model.weight_decay)
    total = case.warmup + case.steps
    stamps: list[tuple[float, float]] = []
    while len(stamps) < total:
        for x in batches:
            loss = loss_fn(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            stamps.append(stamp())
            if len(stamps) == total:
                break
    return steps_per_second(stamps, case.warmup)


class BareModule(L.LightningModule):
    """The hand loop's loss in a LightningModule that logs nothing: what Lightning's loop alone costs."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def training_step(self, batch, batch_idx):
        return self.loss_fn(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.model.lr, weight_decay=self.model.weight_decay)


def run_bare_lightning(case: Case) -> dict[str, float]:
    model, batches, loss_fn, clip = hand_setup(case)
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=case.warmup + case.steps, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=clip,
                        callbacks=[clock])
    trainer.fit(BareModule(model, loss_fn), train_dataloaders=batches)
    return steps_per_second(clock.stamps, case.warmup)


RUNNERS = {"hand": run_hand_loop, "bare": run_bare_lightning, "fit": None}  # fit: run_lightning + overrides
LABELS = {"hand": "hand loop", "bare": "bare Lightning", "fit": "lightning-flows fit"}


def measure(name: str, rounds: int, extra: list[str], variants: list[str]) -> dict:
    case = CASES[name]
    rates = {c: {v: [] for v in variants} for c in CLOCKS}
    ratios = {c: {v: [] for v in variants if v != "hand"} for c in CLOCKS}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate who goes first
        rate = {v: (run_lightning(case, *extra) if v == "fit" else RUNNERS[v](case)) for v in order}
        for c in CLOCKS:
            for v in variants:
                rates[c][v].append(rate[v][c])
                if v != "hand":
                    ratios[c][v].append(rate[v][c] / rate["hand"][c])
        print(f"  {name} round {r + 1}: " + "; ".join(
            f"{c} clock: " + ", ".join(f"{LABELS[v]} {rate[v][c]:.1f}" for v in variants) + " steps/s, ratios "
            + ", ".join(f"{v} {ratios[c][v][-1]:.3f}" for v in ratios[c]) for c in CLOCKS), flush=True)
    return {"case": name,
            "rates": {c: {v: statistics.median(x) for v, x in rates[c].items()} for c in CLOCKS},
            "ratios": {c: {v: (statistics.median(x), min(x), max(x)) for v, x in ratios[c].items()} for c in CLOCKS}}


def profile(name: str, extra: list[str], top: int) -> None:
    case = CASES[name]
    run_lightning(case, *extra)  # warm caches and imports
    profiler = cProfile.Profile()
    profiler.enable()
    run_lightning(case, *extra)
    profiler.disable()
    stats = pstats.Stats(profiler).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per case)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", choices=list(CASES), help="cProfile one Lightning run of this case instead")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--bare", action="store_true",
                        help="also time a bare Lightning Trainer on the hand loop's loss (Lightning's own cost)")
    parser.add_argument("--override", default="",
                        help="extra CLI overrides for the Lightning run, one string: "
                             "--override='--non_finite_guard.enabled=false --trainer.enable_progress_bar=false'")
    opts = parser.parse_args()
    opts.override = shlex.split(opts.override)
    torch.set_num_threads(opts.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):  # start-up banners
        logging.getLogger(name).setLevel(logging.ERROR)
    if opts.steps is not None:
        for key, case in CASES.items():
            CASES[key] = Case(case.config, case.kind, opts.steps, case.warmup)
    if opts.profile:
        profile(opts.profile, opts.override, opts.top)
        return
    print(f"# overhead: torch {torch.__version__}, lightning {L.__version__}, {opts.threads} thread(s), "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, overrides: {' '.join(opts.override) or 'none'}")
    variants = ["hand", "bare", "fit"] if opts.bare else ["hand", "fit"]
    results = [measure(name, opts.rounds, opts.override, variants) for name in opts.cases]
    for clock in CLOCKS:
        what = "steps per CPU-second of the process" if clock == "cpu" else "steps per wall-clock second"
        print(f"\n{clock} clock ({what}):")
        head = " | ".join(f"{LABELS[v]}" for v in variants)
        ratio_head = " | ".join(f"{LABELS[v]} / hand loop (median, min-max)" for v in variants if v != "hand")
        print(f"| case | config | {head} | {ratio_head} |")
        print("|---|---|" + "---|" * (2 * len(variants) - 1))
        for res in results:
            rates = " | ".join(f"{res['rates'][clock][v]:.1f}" for v in variants)
            ratio_cells = " | ".join(f"{m:.3f} ({lo:.3f}-{hi:.3f})" for m, lo, hi in res["ratios"][clock].values())
            print(f"| {res['case']} | {CASES[res['case']].config} | {rates} | {ratio_cells} |")


if __name__ == "__main__":
    main()
