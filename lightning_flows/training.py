"""Training from a config, beneath both the command line and the benchmark.

``cli.py`` (the ``lightning-flows`` command) and ``benchmark/`` both train through this module, so
neither imports the other: a benchmark run is exactly the ``lightning-flows fit`` a user types.
"""

from __future__ import annotations

import copy
import sys

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_flows.callbacks import (DistributedReplicas, EvaluationCallback, NonFiniteGuard, PerStepSeed,
                                       SampleGridCallback)
from lightning_flows.callbacks.checkpointing import AtomicCheckpointIO, RunCheckpoint
from lightning_flows.callbacks.run_directory import RunDirectoryReport
from lightning_flows.callbacks.progress import IntervalProgressBar
from lightning_flows.cli_errors import FlowsArgumentParser, config_file_problem, model_error_of
from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.facts import link_data_facts
from lightning_flows.logger_placement import DEFAULT_LOGGER, place_loggers
from lightning_flows.models import GenerativeModel
from lightning_flows.performance import PerformanceOptions
from lightning_flows.run_checks import (
    RunSetupError, check_batch_sizes, check_ckpt_path, check_devices_exist, check_output_dirs_writable,
    check_training_budget,
)
from lightning_flows.warning_filters import silence_known_noise

PROG = "lightning-flows"
DESCRIPTION = ("Train, test, sample and benchmark generative models (normalizing flows, CNFs, flow matching, VAEs, "
               "GANs, diffusion) from YAML configs: lightning-flows fit --config experiments/toy2d/flow_matching.yaml")
# One line each in `lightning-flows --help`. `sample` and `benchmark` are dispatched by `cli.main` before
# LightningCLI parses anything; they are listed here so that the help (and the "invalid choice" error) shows them.
SUBCOMMAND_HELP = {
    "fit": "Train a model from a config into one run directory.",
    "validate": "Validation loss of a model or of a checkpoint.",
    "test": "Test loss and the shared evaluation of a checkpoint.",
    "sample": "Draw samples from a checkpoint into a PNG.",
    "benchmark": "Train and evaluate a suite of models; write the table.",
}
DISPATCHED_BEFORE_PARSING = ("sample", "benchmark")


def command_line_model_options(args: list[str]) -> list[str]:
    """The model options typed as ``--model.init_args.<option>[.<field>]`` (or ``--model.<option>``) in ``args``,
    dotted below ``init_args``: ``["sampler.rtol", "hidden"]``. Whole ``--model`` values (a class, a file) are not
    options typed one by one and are left to the config's rules."""
    options = []
    for token in args:
        if not token.startswith("--model."):
            continue
        key = token[len("--model."):].split("=", 1)[0]
        for prefix in ("init_args.", "dict_kwargs."):
            key = key.removeprefix(prefix)
        if key and key not in ("class_path", "init_args", "dict_kwargs", "help"):
            options.append(key)
    return options


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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No `predict`: these models have no prediction step (sampling is `lightning-flows sample`).
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMAND_HELP}

    def _add_subcommands(self, parser, **kwargs) -> None:
        """LightningCLI's subcommands with our one-line help each, plus the entries of ``sample`` and ``benchmark``."""
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            subparser_kwargs = {"description": SUBCOMMAND_HELP[subcommand], **kwargs.get(subcommand, {})}
            subcommand_parser = self._prepare_subcommand_parser(self.trainer_class, subcommand, **subparser_kwargs)
            self._subcommand_parsers[subcommand] = subcommand_parser
            subcommands.add_subcommand(subcommand, subcommand_parser, help=SUBCOMMAND_HELP[subcommand])
        for name in DISPATCHED_BEFORE_PARSING:
            subcommands.add_subcommand(name, FlowsArgumentParser(description=SUBCOMMAND_HELP[name]),
                                       help=SUBCOMMAND_HELP[name])

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        # Errors name the closest valid option / the model families. (Set on the instance rather than
        # through LightningCLI's `parser_class`, which Lightning only has since 2.5.1.)
        parser.__class__ = FlowsArgumentParser
        return parser

    def parse_arguments(self, parser, args) -> None:
        problem = config_file_problem(list(sys.argv[1:] if args is None else args))
        if problem:
            parser.error(problem)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand in DISPATCHED_BEFORE_PARSING:
            parser.error(f"'{subcommand}' takes its own options and must come first: {PROG} {subcommand} --help")
        self._checked_checkpoint = None
        self._typed_model_options = command_line_model_options(list(sys.argv[1:] if args is None else args))
        if subcommand and self.config[subcommand].get("ckpt_path"):
            self._checked_checkpoint = check_ckpt_path(self.config[subcommand], self._typed_model_options)

    def _parse_ckpt_path(self) -> None:
        """Adopt the model options of ``--ckpt_path`` (Lightning >= 2.5.5 calls this), from the file already
        checked by :func:`check_ckpt_path` and only as the allow-listed family it names.

        Replaces Lightning's version, which reloads the file and hands the class path the checkpoint names
        (``hyper_parameters._class_path``) to the parser, which imports it: code a file could pick. It also
        drops every model option typed on the command line (``test --ckpt_path ... --model.init_args.sampler.rtol
        1e-6`` evaluated at the saved tolerance); here those win over the checkpoint, which wins over config files.
        """
        checkpoint = getattr(self, "_checked_checkpoint", None)
        if checkpoint is None:  # no --ckpt_path, or `last` (read, with the same checks, when the trainer loads it)
            return
        from lightning_flows.checkpoints import cli_model_config

        subcommand = self.config.subcommand
        init_args = self.config[subcommand].model.get("init_args")
        typed = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
        model = cli_model_config(checkpoint, self.config[subcommand].ckpt_path, typed, self._typed_model_options)
        try:
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the model options saved in {self.config[subcommand].ckpt_path} failed.\n")
            raise

    def before_instantiate_classes(self) -> None:
        # Fail before any work: a run must not train for hours and then find it cannot write its results.
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            check_training_budget(config.trainer)
        check_batch_sizes(config.get("data"))
        check_devices_exist(config.trainer.accelerator, config.trainer.devices)
        check_output_dirs_writable(config)
        # Every logger, the config, checkpoints and sample grids in <root>/<name>/<version or id>/.
        place_loggers(config)

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
        config["callbacks"] = [PerStepSeed(), DistributedReplicas(), RunDirectoryReport(), *listed, *bar]
        trainer = self._instantiate_trainer(config, callbacks)
        _drop_unset_wandb_arguments(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            # Every checkpoint the trainer reads (--ckpt_path, `last`, `hpc`) goes through the checked, weights-only
            # reader, also when RunCheckpoint is off (--trainer.enable_checkpointing false). A user's own
            # CheckpointIO plugin is left alone.
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def _drop_unset_wandb_arguments(trainer) -> None:
    """Lightning's WandbLogger passes ``anonymous=None`` to ``wandb.init``, which recent wandb versions answer
    with a deprecation warning on every run although nothing was set; leave the argument out when unset."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(logger, WandbLogger) and isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)


def build_cli(args: list[str] | None = None, run: bool = True) -> FlowsCLI:
    """Parse ``args`` (``["fit", "--config", ...]``) and, with ``run``, execute the subcommand."""
    silence_known_noise()
    return FlowsCLI(
        GenerativeModel,
        GenerativeDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        parser_kwargs={"prog": PROG, "description": DESCRIPTION},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": "runs",
            # CSV unless the config says otherwise; where it writes is filled in by place_loggers.
            "logger": copy.deepcopy(DEFAULT_LOGGER),
            # Every config has >= 11 training batches per epoch; Lightning's 50 would log no training loss
            # on most of them (and warn about it).
            "log_every_n_steps": 10,
        },
    )
