"""The ``lightning-flows`` command.

``lightning-flows fit|validate|test --config experiments/<dataset>/<family>.yaml`` goes through
LightningCLI (model and data chosen by class path, every argument overridable from the command
line); ``sample`` draws from a checkpoint; ``benchmark`` runs a suite and writes the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_flows.callbacks import NonFiniteGuard, SampleGridCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GenerativeModel


class FlowsCLI(LightningCLI):
    """LightningCLI with the DataModule's example shape linked into every model, sample grids and a
    non-finite guard on every run."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_lightning_class_args(SampleGridCallback, "sample_grid")
        # On for every run: a NaN/inf loss or gradient is skipped instead of corrupting the weights,
        # and a run that keeps producing them stops with a message (`--non_finite_guard.max_consecutive`).
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")


def build_cli(args: list[str] | None = None, run: bool = True) -> FlowsCLI:
    return FlowsCLI(
        GenerativeModel,
        GenerativeDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs"},
    )


def sample_main(argv: list[str]) -> Path:
    from lightning_flows.checkpoints import load_model_and_data
    from lightning_flows.plotting import save_sample_figure

    parser = argparse.ArgumentParser(prog="lightning-flows sample",
                                     description="Draw samples from a checkpoint and save them as a PNG.")
    parser.add_argument("--ckpt", required=True, help="path to a .ckpt written by `lightning-flows fit`")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--out", default="samples.png", help="output PNG path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cpu or cuda")
    opts = parser.parse_args(argv)

    import torch

    model, datamodule = load_model_and_data(opts.ckpt, map_location=opts.device)
    torch.manual_seed(opts.seed)
    samples = model.sample(opts.n)
    path = save_sample_figure(datamodule.to_pixels(samples), opts.out,
                              title=f"{type(model).__name__} on {datamodule.dataset}")
    cost = f", {model.last_sample_nfe} NFE" if model.last_sample_nfe is not None else ""
    print(f"wrote {opts.n} samples to {path}{cost}")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sample":
        from lightning_flows.checkpoints import CheckpointError

        try:
            sample_main(argv[1:])
        except CheckpointError as err:
            raise SystemExit(f"error: {err}") from None
    elif argv and argv[0] == "benchmark":
        from lightning_flows.benchmark.runner import benchmark_main

        benchmark_main(argv[1:])
    else:
        build_cli(argv)


if __name__ == "__main__":
    main()
