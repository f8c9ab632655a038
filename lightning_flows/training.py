"""Training from a config, beneath both the command line and the benchmark.

``cli.py`` (the ``lightning-flows`` command) and ``benchmark/`` both train through this module, so
neither imports the other: a benchmark run is exactly the ``lightning-flows fit`` a user types.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_flows.callbacks import EvaluationCallback, NonFiniteGuard, SampleGridCallback
from lightning_flows.callbacks.progress import IntervalProgressBar
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GenerativeModel
from lightning_flows.performance import PerformanceOptions


class FlowsCLI(LightningCLI):
    """LightningCLI with the DataModule's example shape linked into every model, and on every run sample
    grids, a non-finite guard, the shared evaluation callback and the performance switches."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
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

    def instantiate_trainer(self, **kwargs):
        # The progress bar redraws by the clock (see IntervalProgressBar) unless the run has none or its own.
        config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = kwargs.get("callbacks", config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, IntervalProgressBar()]
        return super().instantiate_trainer(**kwargs)


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
