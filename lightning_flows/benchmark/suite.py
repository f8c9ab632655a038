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
    evaluate_at: [0.1, 0.3, 1.0]        # optional (also per dataset): evaluate at these fractions of the steps
    cheap_evaluate_at: [0.05, 0.2]      # optional: and the cheap numbers only (likelihood; 2D: energy distance)

With ``evaluate_at`` each run's result gets a ``curve``: one point per fraction (step, training seconds and every
number; the last point, at 100%, is the final evaluation itself), which the report draws against training steps
and seconds.

``steps`` is the number of optimizer steps *per network* at ``batch_size``: a GAN, which steps its
discriminator and generator once each per batch, trains for ``steps`` batches (``2 * steps`` in
Lightning's ``global_step``). Every run is a plain ``lightning-flows fit`` whose command line is
recorded, so any row of the table can be reproduced by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.cache import slug
from lightning_flows.evaluation import EvaluationSpec

SUITE_KEYS = {"name", "description", "seeds", "models", "datasets", "recipe", "overrides", "evaluation", "trainer",
              "expected_wall_time", "evaluate_at", "cheap_evaluate_at"}
DATASET_KEYS = {"configs", "steps", "batch_size", "evaluation", "recipe", "models", "data", "evaluate_at",
                "cheap_evaluate_at"}


# Evaluation settings that cannot change a number (so they are not part of a run's key).
COSMETIC_SETTINGS = ("progress", "cache_dir")
# Evaluation settings of the real-vs-real null, which is data only: they change no number a model produces, and a
# report recomputes every row's null with the current ones (``Evaluator.refresh_nulls``), so they are not part of a
# run's key. Keys carry the values they had while they were keyed (null_draws was 20 until 2026-12-07), so that the
# keys of every run and snapshot made before stay valid.
NULL_SETTINGS_AS_KEYED = {"null_draws": 20}
# Extra `lightning-flows fit` arguments given to the benchmark that cannot change a number: drawing a progress
# bar or printing the model summary runs no random draw and touches no weight. Every other extra argument is
# part of the key (a different spelling of the same setting, e.g. `--a=1` for `--a 1`, only costs a retrain).
COSMETIC_ARGUMENTS = ("trainer.enable_progress_bar", "trainer.enable_model_summary")


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
    extra: tuple[str, ...] = ()  # fit arguments given to `lightning-flows benchmark` itself, appended last
    evaluate_at: tuple[float, ...] = ()  # fractions of `steps` at which to evaluate (the curve); () none
    cheap_evaluate_at: tuple[float, ...] = ()  # and the cheap numbers only

    @property
    def name(self) -> str:
        return f"{self.model}/{self.dataset}/seed{self.seed}"

    @property
    def slug(self) -> str:
        return run_slug(self.dataset, self.model, self.seed)

    def with_extra(self, extra: list[str] | tuple[str, ...]) -> RunPlan:
        """This plan with the benchmark's extra fit arguments (``--model.init_args.lr 1e-4 ...``)."""
        return dataclasses.replace(self, extra=tuple(extra))

    def fit_args(self, extra: dict[str, object] | None = None) -> list[str]:
        """The ``lightning-flows fit`` arguments of this run: the plan's, then ``extra`` (the runner's budget
        and placement), then the benchmark's extra arguments, which therefore win."""
        args = ["fit", "--config", str(self.config), "--seed_everything", str(self.seed)]
        for key, value in {**self.args, **(extra or {})}.items():
            args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
        return args + list(self.extra)

    def key(self) -> str:
        """Hash of everything that defines the result: config file contents, arguments (the benchmark's extra
        fit arguments included, but for the cosmetic ones), seed, evaluation (but for the null's settings)."""
        evaluation = {k: v for k, v in self.evaluation.to_dict().items() if k not in COSMETIC_SETTINGS}
        evaluation.update(NULL_SETTINGS_AS_KEYED)
        payload = {"config": self.config.read_text(), "args": self.args, "seed": self.seed,
                   "evaluation": evaluation, "steps": self.steps, "batch_size": self.batch_size}
        counted = arguments_that_count(self.extra)
        if counted:  # absent otherwise, so that the keys of runs without extra arguments stay what they were
            payload["extra"] = counted
        if self.evaluate_at or self.cheap_evaluate_at:  # likewise: a suite without a schedule keeps its keys
            payload["evaluate_at"] = list(self.evaluate_at)
            payload["cheap_evaluate_at"] = list(self.cheap_evaluate_at)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def curve_steps(self) -> tuple[list[int], list[int]]:
        """The steps of the intermediate evaluations (full, cheap): every fraction below 1 as a step (at least 1,
        rounded); 100% is the final evaluation. A cheap step that is also a full one is evaluated in full."""
        def steps(fractions) -> list[int]:
            return sorted({max(1, round(f * self.steps)) for f in fractions} - {self.steps})

        full = steps(self.evaluate_at)
        return full, [s for s in steps(self.cheap_evaluate_at) if s not in full]


def arguments_that_count(extra: list[str] | tuple[str, ...]) -> list[str]:
    """``extra`` without the :data:`COSMETIC_ARGUMENTS` (``--name value`` or ``--name=value``), in order."""
    kept, i = [], 0
    while i < len(extra):
        token = extra[i]
        takes_next = token.startswith("--") and "=" not in token and i + 1 < len(extra) \
            and not extra[i + 1].startswith("--")
        width = 2 if takes_next else 1
        if token[2:].partition("=")[0] not in COSMETIC_ARGUMENTS:
            kept += extra[i:i + width]
        i += width
    return kept


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


EXAMPLE = "experiments/suites/quick.yaml shows every key"


def _check_keys(where: str, mapping: dict, allowed: set[str]) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.")


def _wrong(path: Path, key: str, what: str, value: object, example: str) -> SuiteError:
    return SuiteError(f"{path}: '{key}' must be {what}, got {value!r} ({type(value).__name__}). "
                      f"Write it as, e.g., `{example}` ({EXAMPLE}).")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(path: Path, key: str, value: object, example: str) -> dict:
    """``value`` as a mapping (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _wrong(path, key, "a mapping", value, example)
    return value


def _names(path: Path, key: str, value: object, example: str) -> list[str]:
    """A non-empty list of distinct non-empty strings."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value) \
            or len(set(value)) != len(value):
        raise _wrong(path, key, "a non-empty list of distinct names", value, example)
    return value


def _positive(path: Path, key: str, value: object, what: str, example: str) -> int:
    if not _is_int(value) or value < 1:
        raise _wrong(path, key, f"a whole number >= 1 ({what})", value, example)
    return value


def _seeds(path: Path, value: object) -> list[int]:
    if not isinstance(value, list) or not value or not all(_is_int(s) for s in value) \
            or len(set(value)) != len(value):
        raise _wrong(path, "seeds", "a non-empty list of distinct whole numbers", value, "seeds: [0, 1]")
    return value


def _fractions(path: Path, key: str, value: object) -> tuple[float, ...]:
    """A schedule: a non-empty, strictly increasing list of fractions of the steps in (0, 1]."""
    example = f"{key.rsplit('.', 1)[-1]}: [0.1, 0.3, 1.0]"
    if not isinstance(value, list) or not value or not all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                                           for f in value):
        raise _wrong(path, key, "a non-empty list of fractions of the steps", value, example)
    if not all(0 < f <= 1 for f in value):
        raise SuiteError(f"{path}: '{key}' holds fractions of the steps, each in (0, 1] (1.0 = the final "
                         f"evaluation), got {value!r}. Write it as, e.g., `{example}`.")
    if any(b <= a for a, b in zip(value, value[1:])):
        raise SuiteError(f"{path}: '{key}' must be sorted in increasing order without repeats, got {value!r}. "
                         f"Write it as, e.g., `{example}`.")
    return tuple(float(f) for f in value)


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SuiteError(f"{path} is not valid YAML: {problem}{where}. Fix the syntax there ({EXAMPLE}).") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(f"Cannot read the suite file {path} ({err}); pass a readable YAML file with --suite.") \
            from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path} must hold a mapping of suite settings (name, seeds, models, datasets, ...), "
                         f"not {type(raw).__name__}: {raw!r}. {EXAMPLE}.")
    return raw


def _evaluation_spec(path: Path, dataset: str, values: dict) -> EvaluationSpec:
    """The evaluation of one dataset; a setting of the wrong type is named (not a TypeError from a comparison)."""
    types = {"int": int, "bool": bool, "float": (int, float), "str": str}
    for spec_field in dataclasses.fields(EvaluationSpec):
        if spec_field.name not in values:
            continue
        value, kind = values[spec_field.name], str(spec_field.type).split(" | ")
        if value is None and "None" in kind:
            continue
        expected = types.get(kind[0])
        if expected is not None and (not isinstance(value, expected) or (expected is not bool and
                                                                          isinstance(value, bool))):
            raise SuiteError(f"{path}: evaluation setting '{spec_field.name}' for {dataset} must be {kind[0]}, got "
                             f"{value!r}; set it in the suite's `evaluation:` block or datasets.{dataset}.evaluation.")
    try:
        return EvaluationSpec.from_dict(values)
    except (TypeError, ValueError) as err:
        raise SuiteError(f"{path}: evaluation settings for {dataset}: {err}") from None


def _overrides(path: Path, value: object) -> list[dict]:
    example = "overrides: [{model: gan, reason: why, args: {model.init_args.lr_g: 2.0e-4}}]"
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(o, dict) for o in value):
        raise _wrong(path, "overrides", "a list of mappings", value, example)
    for override in value:
        _check_keys(f"{path}: an override", override, {"model", "dataset", "reason", "args"})
        if not isinstance(override.get("model"), str):
            raise _wrong(path, "overrides[].model", "a model name", override.get("model"), example)
        _mapping(path, "overrides[].args", override.get("args"), example)
    return value


def load_suite(path: str | Path, root: str | Path = ".") -> Suite:
    """Read and check a suite file; configs are resolved relative to ``root`` (the repository). Every
    mistake is a :class:`SuiteError` naming the file, the key and the fix, before anything runs."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise SuiteError(f"Suite file {path} does not exist; the suites live in experiments/suites/.")
    raw = _read_yaml(path)
    _check_keys(str(path), raw, SUITE_KEYS)
    for key in ("name", "models", "datasets"):
        if key not in raw:
            raise SuiteError(f"{path}: missing '{key}' ({EXAMPLE}).")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise _wrong(path, "name", "a non-empty string", raw["name"], "name: quick")
    seeds = _seeds(path, raw.get("seeds", [0]))
    models = _names(path, "models", raw["models"], "models: [vae, flow_matching]")
    datasets_example = "datasets: {8gaussians: {configs: experiments/toy2d, steps: 600, batch_size: 512}}"
    datasets = _mapping(path, "datasets", raw["datasets"], datasets_example)
    if not datasets:
        raise _wrong(path, "datasets", "a non-empty mapping of dataset names to their settings", raw["datasets"],
                     datasets_example)
    recipe = _mapping(path, "recipe", raw.get("recipe"), "recipe: {model.init_args.lr: 1.0e-3}")
    trainer = _mapping(path, "trainer", raw.get("trainer"), "trainer: {limit_val_batches: 0}")
    evaluation = _mapping(path, "evaluation", raw.get("evaluation"), "evaluation: {n_samples: 2000}")
    overrides = _overrides(path, raw.get("overrides"))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _wrong(path, "description", "text", description, "description: what the suite compares")
    runs = []
    data_arguments = {}  # dataset -> its `data:` DataModule arguments
    for dataset, settings in datasets.items():
        where = f"datasets.{dataset}"
        settings = _mapping(path, where, settings, datasets_example)
        _check_keys(f"{path}: {where}", settings, DATASET_KEYS)
        for key in ("configs", "steps", "batch_size"):
            if key not in settings:
                raise SuiteError(f"{path}: {where} needs '{key}' ({EXAMPLE}).")
        if not isinstance(settings["configs"], str):
            raise _wrong(path, f"{where}.configs", "a directory of configs", settings["configs"],
                         "configs: experiments/toy2d")
        steps = _positive(path, f"{where}.steps", settings["steps"], "optimizer steps per network", "steps: 600")
        batch_size = _positive(path, f"{where}.batch_size", settings["batch_size"], "examples per batch",
                               "batch_size: 512")
        spec_values = {**evaluation, **_mapping(path, f"{where}.evaluation", settings.get("evaluation"),
                                                "evaluation: {n_samples: 500}")}
        spec = _evaluation_spec(path, dataset, spec_values)
        dataset_recipe = _mapping(path, f"{where}.recipe", settings.get("recipe"), "recipe: {trainer.precision: 32}")
        data = _mapping(path, f"{where}.data", settings.get("data"), "data: {num_workers: 0}")
        data_arguments[dataset] = dict(data)
        schedules = {}
        for key in ("evaluate_at", "cheap_evaluate_at"):
            value = settings.get(key, raw.get(key))
            schedules[key] = () if value is None else _fractions(path, f"{where}.{key}" if key in settings else key,
                                                                 value)
        dataset_models = _names(path, f"{where}.models", settings["models"], "models: [vae, glow]") \
            if "models" in settings else models
        for model in dataset_models:
            config = root / settings["configs"] / f"{model}.yaml"
            if not config.is_file():
                available = sorted(c.stem for c in (root / settings["configs"]).glob("*.yaml"))
                raise SuiteError(f"{path}: no config {config} for model '{model}' on '{dataset}'; the models "
                                 f"there are {', '.join(available) or 'none'}: fix '{where}.models' (or 'models') "
                                 f"or '{where}.configs'.")
            args: dict[str, object] = {**recipe, **dataset_recipe}
            reasons = []
            for override in overrides:
                if override.get("model") == model and override.get("dataset", dataset) == dataset:
                    if not override.get("reason"):
                        raise SuiteError(f"{path}: the override for {model} on {dataset} needs a 'reason' (why "
                                         f"this model departs from the suite's recipe; the report prints it), e.g. "
                                         f"`overrides: [{{model: {model}, reason: ..., args: {{...}}}}]`.")
                    args.update(override.get("args") or {})
                    reasons.append(override["reason"])
            args.update({f"trainer.{k}": v for k, v in trainer.items()})
            args.update({f"data.{k}": v for k, v in data.items()})
            args.update({"data.dataset": dataset, "data.batch_size": batch_size})
            for seed in seeds:
                runs.append(RunPlan(model, dataset, seed, config, steps, batch_size, dict(args), spec, reasons,
                                    **schedules))
    return Suite(name=raw["name"], path=path, seeds=seeds, models=list(models), datasets=list(datasets),
                 runs=runs, description=description,
                 expected_wall_time=_mapping(path, "expected_wall_time", raw.get("expected_wall_time"),
                                             "expected_wall_time: {cpu: 6 min}"),
                 data=data_arguments)
