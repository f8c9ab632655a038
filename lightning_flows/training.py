"""Training from a config, beneath both the command line and the benchmark.

``cli.py`` (the ``lightning-flows`` command) and ``benchmark/`` both train through this module, so
neither imports the other: a benchmark run is exactly the ``lightning-flows fit`` a user types.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_flows.callbacks import (DistributedReplicas, EvaluationCallback, NonFiniteGuard, PerStepSeed,
                                       SampleGridCallback)
from lightning_flows.callbacks.checkpointing import RunCheckpoint
from lightning_flows.callbacks.progress import IntervalProgressBar
from lightning_flows.cli_errors import FlowsArgumentParser, model_error_of
from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.facts import link_data_facts
from lightning_flows.models import GenerativeModel
from lightning_flows.performance import PerformanceOptions
from lightning_flows.run_checks import (
    RunSetupError, check_ckpt_path, check_devices_exist, check_output_dirs_writable,
)


class FlowsCLI(LightningCLI):
    """LightningCLI with the DataModule's facts (example shape, quantisation levels; see
    :mod:`lightning_flows.data.facts`) linked into every model that takes them and, on every run: sample
    grids, a non-finite guard, the shared evaluation callback, per-rank per-step seeding, replicas that end
    identical, checkpoints that survive any stop, the performance switches and a progress bar that redraws
    by the clock."""

    def add_arguments_to_parser(self, parser) -> None:
        link_data_facts(parser)  # data_shape, data_levels, ... into the models that take them
        parser.add_lightning_class_args(SampleGridCallback, "sample_grid")
        # On for every run: a NaN/inf loss or gradient is skipped instead of corrupting the weights,
        # and a run that keeps producing them stops with a message (`--non_finite_guard.max_consecutive`).
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")
        # The one evaluator, so `lightning-flows test` reports what the benchmark reports
        # (`--evaluation.spec.n_samples`, ...; `--evaluation.every_n_epochs k` also evaluates while fitting).
        parser.add_lightning_class_args(EvaluationCallback, "evaluation")
        # Speed switches (fused Adam and TF32 on CUDA by default; channels_last and torch.compile opt-in):
        # `--performance.compile true`, ... ; bf16 is Lightning's `--trainer.precision bf16-mixed`.
        parser.add_lightning_class_args(PerformanceOptions, "performance")
        # last.ckpt and a final sample grid on every stop, atomic writes, `--ckpt_path last` across versions
        # (`--checkpoint.every_n_train_steps`, `--checkpoint.train_time_interval`, ...: any ModelCheckpoint option).
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        # Errors name the closest valid option / the model families. (Set on the instance rather than
        # through LightningCLI's `parser_class`, which Lightning only has since 2.5.1.)
        parser.__class__ = FlowsArgumentParser
        return parser

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            check_ckpt_path(self.config[subcommand])

    def before_instantiate_classes(self) -> None:
        # Fail before any work: a run must not train for hours and then find it cannot write its results.
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_devices_exist(config.trainer.accelerator, config.trainer.devices)
        check_output_dirs_writable(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # A model or DataModule rejecting its arguments ("Unknown dataset ...", "TimeUNet needs image
            # data ...") is a configuration error whose message names the fix. jsonargparse wraps a model's
            # message in a report of every Union subtype it tried: surface the model's own.
            raise RunSetupError(model_error_of(str(err)) or str(err)) from err

    def instantiate_trainer(self, **kwargs):
        callbacks = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        # Always on, whatever the config lists, and first, so that every other callback already sees the
        # step's seeded random state: DDP ranks draw different noise and a resumed run draws exactly the
        # noise of an uninterrupted one; replicas end fit with identical buffers, and a rank that crashes
        # takes the ranks it launched down with it.
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        # The progress bar redraws by the clock (see IntervalProgressBar) unless the run has none or its own.
        bar = [] if config.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in listed) \
            else [IntervalProgressBar()]
        config["callbacks"] = [PerStepSeed(), DistributedReplicas(), *listed, *bar]
        return self._instantiate_trainer(config, callbacks)


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
