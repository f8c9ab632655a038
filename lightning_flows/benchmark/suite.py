"""A benchmark suite: which models on which datasets, one training budget and one recipe for all of
them, seeds, and the evaluation settings. Loaded from YAML (``experiments/suites/*.yaml``)::

    name: quick
    seeds: [0, 1]
    models: [vae, gan, realnvp, glow, cnf, diffusion, flow_matching]   # experiments/<configs>/<model>.yaml
    datasets:   # a registered or named dataset, or the path of a folder of images / an .npz file
      8gaussians: {configs: experiments/toy2d, steps: 2000, batch_size: 512}
      digits: {configs: experiments/digits, steps: 1000, batch_size: 128, evaluation: {n_samples: 1000}}
      # also per dataset: recipe (merged over the suite's), models (a subset), data (DataModule arguments)
    recipe: {model.init_args.lr: 1.0e-3, trainer.gradient_clip_val: 1.0}   # every model, every dataset
    overrides:                                  # only with a reason, which the table prints
      - {model: gan, reason: "...", args: {model.init_args.lr_g: 2.0e-4}}
    evaluation: {n_samples: 2000, sample_batch_size: 500}   # EvaluationSpec fields
    trainer: {check_val_every_n_epoch: 1000}               # run settings that do not change the model

``steps`` is the number of optimizer steps *per network* at ``batch_size``: a GAN, which steps its
discriminator and generator once each per batch, trains for ``steps`` batches (``2 * steps`` in
Lightning's ``global_step``). Every run is a plain ``lightning-flows fit`` whose command line is
recorded, so any row of the table can be reproduced by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.cache import slug
from lightning_flows.evaluation import EvaluationSpec

SUITE_KEYS = {"name", "description", "seeds", "models", "datasets", "recipe", "overrides", "evaluation", "trainer",
              "expected_wall_time"}
DATASET_KEYS = {"configs", "steps", "batch_size", "evaluation", "recipe", "models", "data"}


# Evaluation settings that cannot change a number (so they are not part of a run's key).
COSMETIC_SETTINGS = ("progress", "cache_dir")


def run_slug(dataset: str, model: str, seed: int) -> str:
    """A run's file name: a dataset given as a path (``datasets: {/data/pets: ...}``) is named by its last part and
    a hash of the whole path, so paths never nest directories and two folders of one name never collide."""
    name = slug(dataset)
    if name != dataset:
        name = f"{name}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"
    return f"{name}__{model}__seed{seed}"


class SuiteError(ValueError):
    """A suite file that cannot be run, with what to change."""


@dataclass
class RunPlan:
    """One model trained on one dataset with one seed."""

    model: str
    dataset: str
    seed: int
    config: Path
    steps: int
    batch_size: int
    args: dict[str, object]  # `lightning-flows fit` overrides (dotted keys), recipe first
    evaluation: EvaluationSpec
    reasons: list[str] = field(default_factory=list)  # why this model deviates from the suite recipe

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}/seed{self.seed}"

    @property
    def slug(self) -> str:
        return run_slug(self.dataset, self.model, self.seed)

    def fit_args(self, extra: dict[str, object] | None = None) -> list[str]:
        """The ``lightning-flows fit`` arguments of this run."""
        args = ["fit", "--config", str(self.config), "--seed_everything", str(self.seed)]
        for key, value in {**self.args, **(extra or {})}.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return args

    def key(self) -> str:
        """Hash of everything that defines the result: config file contents, arguments, seed, evaluation."""
        evaluation = {k: v for k, v in self.evaluation.to_dict().items() if k not in COSMETIC_SETTINGS}
        payload = {"config": self.config.read_text(), "args": self.args, "seed": self.seed,
                   "evaluation": evaluation, "steps": self.steps, "batch_size": self.batch_size}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Suite:
    name: str
    path: Path
    seeds: list[int]
    models: list[str]
    datasets: list[str]
    runs: list[RunPlan]
    description: str = ""
    expected_wall_time: dict = field(default_factory=dict)
    data: dict[str, dict] = field(default_factory=dict)  # dataset -> its `data:` DataModule arguments

    def datamodule(self, dataset: str, **kwargs) -> GenerativeDataModule:
        """The DataModule of ``dataset`` as the suite's runs see it (a folder's image_size, ...)."""
        return GenerativeDataModule(dataset, **{**self.data.get(dataset, {}), **kwargs})


def _check_keys(where: str, mapping: dict, allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.")


def load_suite(path: str | Path, root: str | Path = ".") -> Suite:
    """Read and check a suite file; configs are resolved relative to ``root`` (the repository)."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise SuiteError(f"Suite file {path} does not exist; the suites live in experiments/suites/.")
    raw = yaml.safe_load(path.read_text()) or {}
    _check_keys(str(path), raw, SUITE_KEYS)
    for key in ("name", "models", "datasets"):
        if key not in raw:
            raise SuiteError(f"{path}: missing '{key}'.")
    seeds = [int(s) for s in raw.get("seeds", [0])]
    overrides = raw.get("overrides") or []
    runs = []
    for dataset, settings in raw["datasets"].items():
        _check_keys(f"{path}: datasets.{dataset}", settings, DATASET_KEYS)
        for key in ("configs", "steps", "batch_size"):
            if key not in settings:
                raise SuiteError(f"{path}: datasets.{dataset} needs '{key}'.")
        spec_values = {**(raw.get("evaluation") or {}), **(settings.get("evaluation") or {})}
        try:
            spec = EvaluationSpec.from_dict(spec_values)
        except (TypeError, ValueError) as err:
            raise SuiteError(f"{path}: evaluation settings for {dataset}: {err}") from err
        for model in settings.get("models", raw["models"]):
            config = root / settings["configs"] / f"{model}.yaml"
            if not config.is_file():
                raise SuiteError(f"{path}: no config {config} for model '{model}' on '{dataset}'.")
            args: dict[str, object] = {**(raw.get("recipe") or {}), **(settings.get("recipe") or {})}
            reasons = []
            for override in overrides:
                if override.get("model") == model and override.get("dataset", dataset) == dataset:
                    if not override.get("reason"):
                        raise SuiteError(f"{path}: the override for {model} on {dataset} needs a 'reason'.")
                    args.update(override.get("args") or {})
                    reasons.append(override["reason"])
            args.update({f"trainer.{k}": v for k, v in (raw.get("trainer") or {}).items()})
            args.update({f"data.{k}": v for k, v in (settings.get("data") or {}).items()})
            args.update({"data.dataset": dataset, "data.batch_size": settings["batch_size"]})
            for seed in seeds:
                runs.append(RunPlan(model, dataset, seed, config, int(settings["steps"]), int(settings["batch_size"]),
                                    dict(args), spec, reasons))
    return Suite(name=raw["name"], path=path, seeds=seeds, models=list(raw["models"]),
                 datasets=list(raw["datasets"]), runs=runs, description=raw.get("description", ""),
                 expected_wall_time=raw.get("expected_wall_time") or {},
                 data={dataset: dict(settings.get("data") or {}) for dataset, settings in raw["datasets"].items()})
