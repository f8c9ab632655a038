"""The ``lightning-flows`` command.

``lightning-flows fit|validate|test --config experiments/<dataset>/<family>.yaml`` goes through
LightningCLI (model and data chosen by class path, every argument overridable from the command
line); ``sample`` draws from a checkpoint; ``benchmark`` runs a suite and writes the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_flows.training import FlowsCLI, build_cli

__all__ = ["FlowsCLI", "build_cli", "main", "sample_main"]


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
