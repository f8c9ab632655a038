"""Training from a config, beneath both the command line and the benchmark.

``cli.py`` (the ``lightning-flows`` command) and ``benchmark/`` both train through this module, so
neither imports the other: a benchmark run is exactly the ``lightning-flows fit`` a user types.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from lightning_flows.callbacks import EvaluationCallback, NonFiniteGuard, SampleGridCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GenerativeModel


class FlowsCLI(LightningCLI):
    """LightningCLI with the DataModule's example shape linked into every model, and on every run sample
    grids, a non-finite guard and the shared evaluation callback."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.add_lightning_class_args(SampleGridCallback, "sample_grid")
        # On for every run: a NaN/inf loss or gradient is skipped instead of corrupting the weights,
        # and a run that keeps producing them stops with a message (`--non_finite_guard.max_consecutive`).
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")
        # The one evaluator, so `lightning-flows test` reports what the benchmark reports
        # (`--evaluation.spec.n_samples`, ...; `--evaluation.every_n_epochs k` also evaluates while fitting).
        parser.add_lightning_class_args(EvaluationCallback, "evaluation")


def build_cli(args: list[str] | None = None, run: bool = True) -> FlowsCLI:
    """Parse ``args`` (``["fit", "--config", ...]``) and, with ``run``, execute the subcommand."""
    with warnings.catch_warnings():
        # Passing `args` while sys.argv holds the outer command (`lightning-flows ...`, `benchmark`) is
        # intended here; sys.argv must stay as it is, since Lightning's DDP launcher re-runs it per rank.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return FlowsCLI(
            GenerativeModel,
            GenerativeDataModule,
            subclass_mode_model=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"default_root_dir": "runs"},
        )
