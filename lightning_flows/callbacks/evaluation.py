"""Thin Lightning glue around the one evaluator: when to call it and where to log what it returns.

:class:`EvaluationCallback` runs :class:`lightning_flows.evaluation.Evaluator` at the end of every
``every_n_epochs``-th validation epoch (0: never) and of testing, on *all* ranks (the evaluator is
DDP-collective; a rank-zero-only hook would hang, torchmetrics #2684), with the weights Lightning
holds at that moment (the EMA weights when ``EMACallback`` swapped them in), and logs every number
as ``<stage>/<name>``. Every CLI run has one (``--evaluation.*``), active at test time, so
``lightning-flows test`` reports exactly what the benchmark reports.

:class:`FIDCallback`, :class:`BitsPerDimCallback` and :class:`SamplingCostCallback` are the same
callback with a narrower spec, kept for configs that want one kind of number on their own schedule.
"""

from __future__ import annotations

import dataclasses
import math
import random
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch

from lightning_flows.callbacks.ema import EMACallback
from lightning_flows.callbacks.training_timer import TrainingTimer
from lightning_flows.evaluation import EvaluationSpec, Evaluator, metric_names, sampling_weights, weights_in_use


DEFAULT_SPEC = EvaluationSpec()  # never mutated: each callback keeps its own Evaluator


def should_evaluate(trainer: L.Trainer, every_n_epochs: int) -> bool:
    """Validation epochs to evaluate on: not the sanity check, every ``every_n_epochs``-th (0 = never)."""
    if trainer.sanity_checking or every_n_epochs < 1:
        return False
    return (trainer.current_epoch + 1) % every_n_epochs == 0


def likelihood_limit(trainer: L.Trainer, stage: str, split_size: int, batch_size: int) -> int | None:
    """Examples the likelihood may use under ``limit_val_batches`` / ``limit_test_batches``."""
    limit = trainer.limit_val_batches if stage == "val" else trainer.limit_test_batches
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return None
    if isinstance(limit, float):
        return max(1, math.floor(limit * split_size))
    return max(1, min(split_size, int(limit) * batch_size))


class EvaluationCallback(L.Callback):
    """Evaluate with ``spec`` during validation (every ``every_n_epochs``-th epoch) and testing.

    Args:
        spec: what to measure (:class:`EvaluationSpec`; in YAML a mapping of its fields).
        every_n_epochs: validation epochs between evaluations; 0 evaluates at test time only.
        on_test: evaluate at the end of ``trainer.test`` / ``lightning-flows test``.
    """

    def __init__(self, spec: EvaluationSpec = DEFAULT_SPEC, every_n_epochs: int = 0, on_test: bool = True):
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0, got {every_n_epochs}.")
        self.spec = spec if isinstance(spec, EvaluationSpec) else EvaluationSpec.from_dict(spec)
        self.every_n_epochs, self.on_test = every_n_epochs, on_test
        self.evaluator = Evaluator(self.spec)
        self.last_result: dict = {}
        self.last_logged: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.on_test:
            self.evaluate(trainer, pl_module, "test")

    def evaluate(self, trainer: L.Trainer, pl_module, stage: str) -> dict:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError(f"{type(self).__name__} needs the GenerativeDataModule (its splits and quantisation): "
                               f"pass trainer.fit(model, datamodule=dm).")
        datamodule.setup()
        # Validation scores the val split; testing the spec's likelihood_split (default test: a user who sets
        # `--evaluation.spec.likelihood_split train` asks how the model does on its training data, e.g. to see
        # overfitting, and gets exactly that, recorded as result["likelihood_split"] and logged as
        # test/<name>_on_train, never under the test split's names).
        split = "val" if stage == "val" else self.spec.likelihood_split
        limit = likelihood_limit(trainer, stage, len(getattr(datamodule.splits, split)),
                                 self.spec.likelihood_batch_size)
        result = self.evaluator.evaluate(pl_module, datamodule, weights=weights_in_use(trainer),
                                         likelihood_split=split, max_likelihood_examples=limit)
        names = metric_names(result)
        if split != stage:  # e.g. `test` scoring the training split: its likelihoods say so in their names
            scored = self.evaluator.last_likelihood_keys & names.keys()
            names.update({key: f"{names[key]}_on_{split}" for key in scored})
        logged = {}
        for key, name in names.items():
            logged[f"{stage}/{name}"] = float(result[key])
            # Identical on every rank already (the evaluator reduces), so no further sync.
            pl_module.log(f"{stage}/{name}", float(result[key]), sync_dist=False)
        self.last_result, self.last_logged = result, logged
        return result


class FIDCallback(EvaluationCallback):
    """Sample quality only: FID and KID (one feature extractor) with their real-vs-real floors,
    precision/recall, plus NFE and ms per sample of the same samples (2D data: energy distance).

    Args: ``n`` samples in chunks of ``chunk_size`` against ``real_split``; the rest as in
    :class:`EvaluationSpec`.
    """

    def __init__(self, n: int = 1000, feature_extractor: str = "classifier",
                 feature_extractor_weights_path: str | None = None, real_split: str = "test",
                 every_n_epochs: int = 1, chunk_size: int = 250, seed: int = 0, cache_dir: str | None = None,
                 log_sampling_cost: bool = True, progress: bool = True):
        from lightning_flows.metrics.features import FEATURE_EXTRACTORS

        if feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(f"Unknown feature_extractor '{feature_extractor}'. Choose one of: "
                             f"{', '.join(FEATURE_EXTRACTORS)}.")
        spec = EvaluationSpec(n_samples=n, sample_batch_size=chunk_size, seed=seed, likelihood=False, quality=True,
                              reference_split=real_split, feature_extractor=feature_extractor,
                              feature_extractor_weights_path=feature_extractor_weights_path,
                              timing=log_sampling_cost, extras=False, cache_dir=cache_dir, progress=progress)
        super().__init__(spec, every_n_epochs=every_n_epochs)


class BitsPerDimCallback(EvaluationCallback):
    """Likelihoods only: ``<stage>/nll_<kind>`` and (discrete data) ``<stage>/bpd_<kind>`` for every kind
    the family reports (exact, bound or estimate; nothing for a GAN), over the stage's split,
    honouring ``limit_val_batches`` / ``limit_test_batches``."""

    def __init__(self, every_n_epochs: int = 1, on_test: bool = True, batch_size: int = 500, seed: int = 0,
                 progress: bool = True):
        spec = EvaluationSpec(likelihood=True, quality=False, timing=False, likelihood_batch_size=batch_size,
                              seed=seed, progress=progress)
        super().__init__(spec, every_n_epochs=every_n_epochs, on_test=on_test)


class SamplingCostCallback(EvaluationCallback):
    """Sampling cost only: ``<stage>/nfe_per_sample`` (absent when the family reports none) and
    ``<stage>/ms_per_sample`` of ``n`` samples drawn ``chunk_size`` at a time after a warm-up."""

    def __init__(self, n: int = 256, chunk_size: int = 256, every_n_epochs: int = 1, seed: int = 0):
        spec = EvaluationSpec(n_samples=max(2, n), sample_batch_size=chunk_size, seed=seed, likelihood=False,
                              quality=False, timing=True, extras=False, progress=False)
        super().__init__(spec, every_n_epochs=every_n_epochs)


class EvaluationSchedule(L.Callback):
    """Evaluate with ``spec`` at given optimizer steps of a run (per network, the benchmark's ``steps``), for the
    benchmark's quality-against-budget curves; the points land in ``points``.

    The numbers come from the one :class:`Evaluator`, on the weights ``lightning-flows sample`` would use (the
    EMA average when the run keeps one, swapped in and back out), and the training state is restored exactly
    afterwards: random generators (torch, CUDA, numpy, Python), train mode and weights, so a run with a schedule
    trains the same weights as one without. Each point's ``train_seconds`` is the run's :class:`TrainingTimer`
    at that step, which counts no evaluation. A collective under DDP: every rank evaluates at the same step.

    Args:
        steps: optimizer steps per network after which to evaluate with ``spec`` (a GAN's ``global_step`` is
            twice that).
        spec: what to measure (:class:`EvaluationSpec` fields).
        cheap_steps: further steps at which only the cheap numbers are measured (:func:`cheap_spec`).
    """

    def __init__(self, steps: list[int], spec: dict | None = None, cheap_steps: list[int] | None = None):
        super().__init__()
        cheap_steps = [s for s in (cheap_steps or []) if s not in steps]
        if any(not isinstance(s, int) or s < 1 for s in [*steps, *cheap_steps]):
            raise ValueError(f"EvaluationSchedule steps must be whole numbers >= 1, got {steps} and {cheap_steps}.")
        self.spec = spec if isinstance(spec, EvaluationSpec) else EvaluationSpec.from_dict(spec)
        self.schedule = {**{s: "cheap" for s in cheap_steps}, **{s: "full" for s in steps}}
        self._evaluators: dict[str, Evaluator] = {}
        self.points: list[dict] = []

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        position = trainer.callbacks.index(self)
        late = [type(c).__name__ for c in trainer.callbacks[position + 1:]
                if isinstance(c, (EMACallback, TrainingTimer))]
        if late:
            raise ValueError(f"EvaluationSchedule must come after {', '.join(late)} in the callbacks, so that it "
                             f"evaluates the step's EMA average and its points count no evaluation as training.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step // pl_module.optimizer_steps_per_batch
        if step in self.schedule and step not in {p["step"] for p in self.points}:
            self.points.append(self.evaluate(trainer, pl_module, step))

    def evaluate(self, trainer: L.Trainer, pl_module, step: int) -> dict:
        kind = self.schedule[step]
        if kind not in self._evaluators:  # each keeps its feature extractor and reference features between points
            image = len(trainer.datamodule.data_shape) == 3
            self._evaluators[kind] = Evaluator(self.spec if kind == "full" else cheap_spec(self.spec, image))
        timer = next((c for c in trainer.callbacks if isinstance(c, TrainingTimer)), None)
        with preserved_random_state(pl_module.device), sampling_weights(trainer, pl_module) as weights:
            result = self._evaluators[kind].evaluate(pl_module, trainer.datamodule, weights=weights)
        return curve_point(result, step, timer.seconds if timer is not None else None, kind)

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = list(state_dict.get("points", []))


def cheap_spec(spec: EvaluationSpec, image: bool) -> EvaluationSpec:
    """The cheap numbers of ``spec``: the likelihood, plus on 2D data the sample metrics (energy distance, ...),
    which cost little there; no FID (images), no timing, no family extras, no extra sample sets."""
    return dataclasses.replace(spec, quality=spec.quality and not image, timing=False, extras=False,
                               sampling_std_draws=0, straightness_paths=0)


def curve_point(result: dict, step: int, train_seconds: float | None, evaluation: str = "full") -> dict:
    """One point of a run's curve: its step, training seconds and every number of ``result`` a logger records."""
    return {"step": step, "train_seconds": train_seconds, "evaluation": evaluation, "weights": result.get("weights"),
            **{key: float(result[key]) for key in metric_names(result)}}


@contextmanager
def preserved_random_state(device: torch.device):
    """Restore torch's (CPU and, on a GPU, ``device``'s), numpy's and Python's random state on exit."""
    cuda = device.type == "cuda"
    cpu, on_device = torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state(on_device, device)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
