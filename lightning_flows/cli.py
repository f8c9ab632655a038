"""The ``lightning-flows`` command.

``lightning-flows fit|validate|test --config experiments/<dataset>/<family>.yaml`` goes through
LightningCLI (model and data chosen by class path, every argument overridable from the command
line); ``sample`` draws from a checkpoint; ``benchmark`` runs a suite and writes the table.
``lightning-flows --help`` lists all five, and each has its own ``--help``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from lightning_flows.run_checks import check_writable
from lightning_flows.training import FlowsCLI, build_cli

__all__ = ["FlowsCLI", "build_cli", "main", "sample_main"]


def default_sample_path(checkpoint: str | Path, n: int, seed: int, suffix: str = "") -> Path:
    """Beside the run's other pictures when ``checkpoint`` is in a run's ``checkpoints/`` directory
    (``<run dir>/samples/sample_n<n>_seed<seed><suffix>.png``), else ``samples<suffix>.png`` here."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "samples" / f"sample_n{n}_seed{seed}{suffix}.png"
    return Path(f"samples{suffix}.png")


def requested_grid(model, requested_class: int | None, n: int, per_class: int, guidance: float):
    """What ``sample`` draws: ``(labels or None, images per row, file-name suffix, title suffix)``.

    A class-conditional model draws ``n`` samples of ``requested_class``, or one row of ``per_class`` samples
    per class when no class is given. Raises ``ValueError`` (with the fix) for a class on an unconditional
    model, a class out of range, or guidance on an unconditional model.
    """
    import torch

    conditional = getattr(model, "is_conditional", False)
    if not conditional:
        if requested_class is not None or guidance != 1.0:
            raise ValueError(f"{type(model).__name__} in this checkpoint is unconditional (trained without labels): "
                             f"drop --class and --guidance, or train a conditional model "
                             f"(experiments/<dataset>/<family>_conditional.yaml).")
        return None, None, "", ""
    guide = "" if guidance == 1.0 else f"_w{guidance:g}"
    if requested_class is None:
        labels = torch.arange(model.num_classes).repeat_interleave(per_class)
        return labels, per_class, f"_by_class{guide}", f", one row per class, w={guidance:g}"
    if not 0 <= requested_class < model.num_classes:
        raise ValueError(f"--class {requested_class} is out of range: this model has classes "
                         f"0..{model.num_classes - 1}.")
    labels = torch.full((n,), requested_class, dtype=torch.long)
    return labels, None, f"_class{requested_class}{guide}", f", class {requested_class}, w={guidance:g}"


def sample_main(argv: list[str]) -> Path:
    from lightning_flows.checkpoints import load_model_and_data, local_checkpoint_path
    from lightning_flows.plotting import save_sample_figure

    parser = argparse.ArgumentParser(prog="lightning-flows sample",
                                     description="Draw samples from a checkpoint and save them as a PNG.")
    parser.add_argument("--ckpt", required=True, help="path to a .ckpt written by `lightning-flows fit`")
    parser.add_argument("--n", type=int, default=64, help="number of samples (of --class, for a conditional model)")
    parser.add_argument("--class", dest="requested_class", type=int, default=None,
                        help="class-conditional checkpoints: draw this class (default: one row per class)")
    parser.add_argument("--per-class", type=int, default=10,
                        help="samples per row when --class is omitted on a conditional checkpoint")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance weight w, any finite number (flow matching and diffusion "
                             "conditional checkpoints): the sampler follows f(x, t, no class) + w (f(x, t, y) - "
                             "f(x, t, no class)), so w=1 is the conditional model, w=0 the unconditional one, w>1 "
                             "sharpens the class and w<0 steers away from it (anti-guidance)")
    parser.add_argument("--out", help="output image path, or an existing directory to write the default name into "
                                       "(default: <run dir>/samples/sample_n<n>_seed<seed>.png when the checkpoint is "
                                       "in a run's checkpoints/, else ./samples.png); .png is added to a name without "
                                       "an extension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cpu, cuda or cuda:1")
    opts = parser.parse_args(argv)

    import torch

    # Every input is checked before the checkpoint is read or anything is written. A file:// URL is its local
    # file (also for the default output path beside it); a remote name is refused, naming the fix.
    opts.ckpt = local_checkpoint_path(opts.ckpt)
    if opts.n < 1 or opts.per_class < 1:
        parser.error("--n and --per-class must be >= 1.")
    if not math.isfinite(opts.guidance):
        parser.error(f"--guidance {opts.guidance} is not a finite number: guidance weighs two velocity (or noise) "
                     f"predictions, and a NaN or infinite weight makes every sample NaN. Pass a finite w "
                     f"(1: the conditional model).")
    problem = device_problem(opts.device)
    if problem:
        parser.error(problem)
    if opts.out:
        check_writable(sample_directory(opts.out), "--out", consequence="the samples cannot be saved there",
                       fix="Pass a writable path with --out PATH.png (or --out DIR).")
    model, datamodule = load_model_and_data(opts.ckpt, map_location=opts.device)
    try:
        labels, per_row, suffix, title = requested_grid(model, opts.requested_class, opts.n, opts.per_class,
                                                        opts.guidance)
        torch.manual_seed(opts.seed)
        if labels is None:
            samples = model.sample(opts.n)
        else:
            kwargs = {} if opts.guidance == 1.0 else {"guidance": opts.guidance}
            samples = model.sample(len(labels), y=labels.to(opts.device), **kwargs)
    except ValueError as err:
        parser.error(str(err))
    default = default_sample_path(opts.ckpt, opts.n, opts.seed, suffix)
    out = sample_output_path(opts.out, default.name) if opts.out else default
    path = save_sample_figure(datamodule.to_pixels(samples), out,
                              title=f"{type(model).__name__} on {datamodule.dataset}{title}", per_row=per_row)
    cost = f", {model.last_sample_nfe} NFE" if model.last_sample_nfe is not None else ""
    away = f"; w={opts.guidance:g} < 0 steers away from the class" if opts.guidance < 0 and labels is not None else ""
    print(f"wrote {len(samples)} samples to {path}{cost}{away}")
    return path


def device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot be used here (the fix included), or None."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device name; use cpu, cuda, cuda:<index> or mps."
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (f"--device {name}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False; "
                    f"a CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES hides them). Use --device cpu.")
        if device.index is not None and device.index >= count:
            return f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}."
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS (Apple GPU) is not available on this machine. Use --device cpu."
    return None


def _names_a_directory(out: str | Path) -> bool:
    return str(out).endswith(("/", "\\")) or Path(out).is_dir()


def sample_directory(out: str | Path) -> Path:
    """The directory ``--out`` writes into: ``out`` itself when it is a directory (or ends with /), else its parent."""
    return Path(out) if _names_a_directory(out) else Path(out).parent


def sample_output_path(out: str | Path, default_name: str) -> Path:
    """The file ``--out`` names: ``<out>/<default_name>`` for a directory, else ``out`` (``.png`` added when it has
    no extension)."""
    if _names_a_directory(out):
        return Path(out) / default_name
    out = Path(out)
    return out if out.suffix else out.with_name(out.name + ".png")


def end_distributed() -> None:
    """End a DDP run's process group on every rank together, before the interpreter shuts down.

    A ``DistributedDataParallel`` wrapper (and its reducer) sits in reference cycles that keep the process group
    alive past Lightning's ``destroy_process_group`` at exit; freed during interpreter shutdown, while gloo's threads
    still run, it kills the process with SIGABRT ("terminate called without an active exception"), now and then.
    So: collect those cycles, wait for every rank, destroy the group. (Only after a subcommand ended normally on
    this rank: after a failure the other ranks may never arrive.)
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def non_finite_stop(cli) -> str | None:
    """The non-finite guard's message when it stopped this run (a failure: the exit status must say so)."""
    from lightning_flows.callbacks import NonFiniteGuard

    trainer = getattr(cli, "trainer", None)
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, NonFiniteGuard) and callback.stop_reason:
            return callback.stop_reason
    return None


def main(argv: list[str] | None = None) -> None:
    from lightning_flows.checkpoints import CheckpointError
    from lightning_flows.run_checks import RunSetupError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "sample":
            sample_main(argv[1:])
        elif argv and argv[0] == "benchmark":
            from lightning_flows.benchmark.runner import benchmark_main

            benchmark_main(argv[1:])
            end_distributed()
        else:
            stopped = non_finite_stop(build_cli(argv))
            end_distributed()
            if stopped:
                # Training diverged: last.ckpt holds the last good weights, but the run did not finish.
                raise SystemExit(f"error: {stopped}")
    except (CheckpointError, RunSetupError) as err:
        # Bad input, not a bug: the message says what to do, a traceback would only bury it.
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
