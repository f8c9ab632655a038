"""Training from a config, beneath both the command line and the benchmark.

``cli.py`` (the ``lightning-flows`` command) and ``benchmark/`` both train through this module, so
neither imports the other: a benchmark run is exactly the ``lightning-flows fit`` a user types.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from lightning_flows.callbacks import NonFiniteGuard, SampleGridCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.facts import link_data_facts
from lightning_flows.models import GenerativeModel


class FlowsCLI(LightningCLI):
    """LightningCLI with the DataModule's facts (example shape, quantisation levels; see
    :mod:`lightning_flows.data.facts`) linked into every model that takes them, sample grids and a
    non-finite guard on every run."""

    def add_arguments_to_parser(self, parser) -> None:
        link_data_facts(parser)  # data_shape, data_levels, ... into the models that take them
        parser.add_lightning_class_args(SampleGridCallback, "sample_grid")
        # On for every run: a NaN/inf loss or gradient is skipped instead of corrupting the weights,
        # and a run that keeps producing them stops with a message (`--non_finite_guard.max_consecutive`).
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")


def build_cli(args: list[str] | None = None, run: bool = True) -> FlowsCLI:
    """Parse ``args`` (``["fit", "--config", ...]``) and, with ``run``, execute the subcommand."""
    return FlowsCLI(
        GenerativeModel,
        GenerativeDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": "runs"},
    )
