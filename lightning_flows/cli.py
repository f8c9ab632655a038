"""The ``lightning-flows`` command.

``lightning-flows fit|validate|test --config experiments/<dataset>/<family>.yaml`` goes through
LightningCLI (model and data chosen by class path, every argument overridable from the command
line); ``sample`` draws from a checkpoint; ``benchmark`` runs a suite and writes the table.
``lightning-flows --help`` lists all five, and each has its own ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    from lightning_flows.checkpoints import load_model_and_data
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
                        help="classifier-free guidance weight w (1: the conditional model; flow matching and "
                             "diffusion conditional checkpoints)")
    parser.add_argument("--out", help="output PNG path (default: <run dir>/samples/sample_n<n>_seed<seed>.png when "
                                       "the checkpoint is in a run's checkpoints/, else ./samples.png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    opts = parser.parse_args(argv)

    import torch

    if opts.n < 1 or opts.per_class < 1:
        parser.error("--n and --per-class must be >= 1.")
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
    out = opts.out or default_sample_path(opts.ckpt, opts.n, opts.seed, suffix)
    path = save_sample_figure(datamodule.to_pixels(samples), out,
                              title=f"{type(model).__name__} on {datamodule.dataset}{title}", per_row=per_row)
    cost = f", {model.last_sample_nfe} NFE" if model.last_sample_nfe is not None else ""
    print(f"wrote {len(samples)} samples to {path}{cost}")
    return path


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
        else:
            build_cli(argv)
    except (CheckpointError, RunSetupError) as err:
        # Bad input, not a bug: the message says what to do, a traceback would only bury it.
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
