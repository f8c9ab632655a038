"""One run directory per run, whatever the logger: ``<root>/<name>/<version or id>/``.

The CLI calls :func:`place_loggers` on the parsed configuration, before anything is instantiated, so that
every logger writes into the same directory, which then also holds the resolved ``config.yaml``,
``checkpoints/`` and ``samples/`` (those follow the first logger; see
:func:`lightning_flows.callbacks.run_directory.run_dir`):

* ``root`` is the logger's ``save_dir`` when the configuration sets one, else ``trainer.default_root_dir``
  (``runs`` by default), so ``--trainer.default_root_dir DIR`` moves the whole run;
* ``name`` is the logger's ``name`` when set, else the experiment's name, taken from the config file
  (``experiments/toy2d/flow_matching.yaml`` -> ``toy2d_flow_matching``), else ``<dataset>_<family>``;
* CSV and TensorBoard number their versions (``version_0``, ``version_1``, ...); a wandb run is its id,
  chosen here when not given, because wandb's own files (``wandb/``) go where its ``save_dir`` points
  and that must be known before the run starts.

With several loggers the first one's ``<root>/<name>/<version>`` is used by all of them.
"""

from __future__ import annotations

import os
import re
import secrets
import string
import sys
from pathlib import Path

from jsonargparse import Namespace

CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
DEFAULT_LOGGER = {"class_path": CSV_LOGGER, "init_args": {"save_dir": ""}}  # "": the run's root (see above)
LIGHTNING_DEFAULT_NAME = "lightning_logs"  # Lightning's loggers' default name: "not chosen"
WANDB_PROJECT = "lightning-flows"


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def experiment_name(config) -> str:
    """The name of the experiment ``config`` (a parsed subcommand configuration) describes."""
    config_files = [str(p) for p in (config.get("config") or [])]
    if config_files:
        path = Path(config_files[-1])
        return f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem
    model = config.get("model")
    family = str(model.get("class_path", "model")).rpartition(".")[2] if isinstance(model, Namespace) else "model"
    data = config.get("data")
    dataset = data.get("dataset") if isinstance(data, Namespace) else None
    return "_".join(part for part in (str(dataset) if dataset else "", _snake(family)) if part)


def launched_as_global_rank_zero() -> bool:
    """True unless the launcher marked this process as another rank (Lightning's DDP launcher sets
    ``LOCAL_RANK``/``NODE_RANK``, torchrun ``RANK``, srun ``SLURM_PROCID``). Read before any process group
    exists, which is when the loggers are placed."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def new_wandb_id() -> str:
    """An id in wandb's own format (8 characters of [a-z0-9])."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def next_version(experiment_dir: Path) -> int:
    """The version number CSVLogger / TensorBoardLogger would pick in ``experiment_dir``."""
    if not experiment_dir.is_dir():
        return 0
    versions = [int(p.name[len("version_"):]) for p in experiment_dir.iterdir()
                if p.is_dir() and p.name.startswith("version_") and p.name[len("version_"):].isdigit()]
    return max(versions, default=-1) + 1


def _kind(class_path: str) -> str:
    """'versioned' (CSV, TensorBoard), 'wandb' or 'other' (left as configured)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    # Only a module already imported is read: jsonargparse imported the logger class while parsing, and placing it
    # must never import what a config file names.
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(sys.modules[module], name)
    except (KeyError, AttributeError):
        return "other"
    if isinstance(cls, type) and issubclass(cls, (CSVLogger, TensorBoardLogger)):
        return "versioned"
    if isinstance(cls, type) and issubclass(cls, WandbLogger):
        return "wandb"
    return "other"


def _unset(value) -> bool:
    return value is None or str(value) in ("", ".")


def _root_of(kind: str, init: Namespace, default_root: str) -> str:
    if not _unset(init.get("save_dir")):
        return str(init.save_dir)
    if kind == "wandb" and not _unset(init.get("dir")):
        return str(init.dir)
    return default_root


def _name_of(init: Namespace, experiment: str) -> str:
    name = init.get("name")
    return experiment if name is None or name == LIGHTNING_DEFAULT_NAME else str(name)


def place_loggers(config) -> None:
    """Fill in, in place, where the loggers of ``config`` (a parsed subcommand configuration) write."""
    trainer = config.trainer
    default_root = str(trainer.default_root_dir) if trainer.get("default_root_dir") else os.getcwd()
    logger = trainer.get("logger")
    if logger is None or logger is True:  # Lightning's default logger, placed like any other
        logger = Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=""))
    if logger is False:
        return
    specs = logger if isinstance(logger, list) else [logger]
    placeable = [(spec, _kind(str(spec.class_path))) for spec in specs
                 if isinstance(spec, Namespace) and spec.get("class_path")]
    placeable = [(spec, kind) for spec, kind in placeable if kind != "other"]
    if placeable:
        experiment = experiment_name(config)
        for spec, _ in placeable:
            spec.init_args = spec.get("init_args") or Namespace()
        first, first_kind = placeable[0]
        root = _root_of(first_kind, first.init_args, default_root)
        name = _name_of(first.init_args, experiment).replace(os.sep, "_")
        wandb_ids = {id(spec): str(spec.init_args.get("version") or spec.init_args.get("id") or new_wandb_id())
                     for spec, kind in placeable if kind == "wandb"}
        version = _directory_version(placeable, wandb_ids, Path(root) / name)
        for spec, kind in placeable:
            _place(spec.init_args, kind, root, name, version, wandb_ids.get(id(spec)))
    trainer.logger = logger if isinstance(logger, list) else specs[0]


def _directory_version(placeable, wandb_ids: dict, experiment_dir: Path):
    """The ``<version or id>`` of the run directory; None lets a single CSV/TensorBoard logger number it."""
    first, first_kind = placeable[0]
    if first_kind == "wandb":
        return wandb_ids[id(first)]
    if first.init_args.get("version") is not None:
        return first.init_args.version
    if wandb_ids:  # a local logger beside wandb: the directory is named after the wandb run
        return next(iter(wandb_ids.values()))
    # Several loggers must agree on one directory, so the number is chosen here rather than by each.
    return next_version(experiment_dir) if len(placeable) > 1 else None


def _place(init: Namespace, kind: str, root: str, name: str, version, wandb_id: str | None) -> None:
    if kind == "versioned":
        init.save_dir, init.name = root, name
        if version is not None:
            init.version = version
        return
    directory = version if isinstance(version, str) else f"version_{version}"
    init.save_dir = str(Path(root) / name / directory)  # wandb puts its own files in <save_dir>/wandb/
    init.name, init.id, init.version = name, wandb_id, None
    if launched_as_global_rank_zero():
        # wandb looks for the git repository (to record the commit) from its directory, and warns
        # "git root ... does not exist" when that directory is not there yet. Other ranks never start wandb
        # (and may have drawn another id), so they create nothing.
        Path(init.save_dir).mkdir(parents=True, exist_ok=True)
    if init.get("project") is None and "WANDB_PROJECT" not in os.environ:
        init.project = WANDB_PROJECT
