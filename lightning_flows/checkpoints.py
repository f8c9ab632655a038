"""Loading checkpoints safely, with errors that say what to do.

A checkpoint is untrusted input (users download them). Two rules keep it from running code:

* the file is unpickled with ``weights_only=True`` (tensors and plain containers only, plus the
  plain-data classes in :data:`SAFE_GLOBALS`);
* the model class it names is looked up in :func:`allowed_model_classes`, a fixed table of the
  :class:`GenerativeModel` subclasses exported by :mod:`lightning_flows.models`. Nothing the file
  says is ever imported or called: a name outside the table is a :class:`CheckpointError`.

Only local files are read (:func:`local_checkpoint_path`): a ``file://`` URL is its local path, and
any other URL or registry name is refused with the fix (download it, pass the local path). Lightning
would fetch a URL itself and unpickle it with ``weights_only=False``; and a file fetched by every DDP
rank, or again on a rerun, need not be the same file.
"""

from __future__ import annotations

import dataclasses
import inspect
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.facts import fill_data_facts
from lightning_flows.models import GenerativeModel
from lightning_flows.ode import SolverConfig

# Plain-data classes our hyperparameters may hold; allow-listed for weights_only unpickling.
SAFE_GLOBALS = [SolverConfig]
MODEL_CLASS_KEY = "lightning_flows_model_class"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def model_class_name(cls: type) -> str:
    """The name a checkpoint records for ``cls``: its import path, e.g. ``lightning_flows.models.vae.VAE``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def allowed_model_classes() -> dict[str, type[GenerativeModel]]:
    """Every concrete family exported by :mod:`lightning_flows.models`, by recorded name and by short name."""
    import lightning_flows.models as models

    table: dict[str, type[GenerativeModel]] = {}
    for name in models.__all__:
        cls = getattr(models, name)
        if inspect.isclass(cls) and issubclass(cls, GenerativeModel) and cls is not GenerativeModel:
            table[model_class_name(cls)] = cls
            table[cls.__name__] = cls
    return table


def local_checkpoint_path(path: str | Path) -> Path:
    """The local file ``path`` names: a path, or a ``file://`` URL. Remote names are refused (see the module)."""
    text = str(path)
    if text.startswith("file:"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc in ("", "localhost"):
            return Path(urllib.parse.unquote(parsed.path))
    if "://" in text or text.startswith(("file:", "registry:")):
        example = "curl -fL -o model.ckpt '<the URL>'" if "://" in text else "the registry's download command"
        raise CheckpointError(f"{text} is not a local file: lightning-flows reads checkpoints only from local disk, "
                              f"where it checks them before anything loads them. Download it yourself ({example}) "
                              f"and pass the local file instead (e.g. --ckpt_path model.ckpt, sample --ckpt "
                              f"model.ckpt).")
    return Path(text)


def load_failure(err: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in one line. For a file holding pickled objects other
    than tensors and plain data, that (and the global torch names), instead of torch's first line, which goes on to
    suggest ``weights_only=False``: the call that would run the file's code."""
    text = str(err)
    if "Weights only load failed" in text:
        named = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        return (f"not unpickled: it holds objects other than tensors and plain data, and unpickling them could "
                f"run code{'; torch: ' + named[:200].rstrip('.') if named else ''}")
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def read_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint at ``path`` (``weights_only=True``, :data:`SAFE_GLOBALS` only); ``mmap``: map the tensors
    instead of reading them (to look at the step count of many files)."""
    path = local_checkpoint_path(path)
    if path.is_dir():
        found = sorted(path.glob("**/*.ckpt"), key=lambda p: (p.name != "last.ckpt", len(p.parts), str(p)))
        example = f", e.g. {found[0]}" if found else " (there are none in it)"
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; pass one of the .ckpt files of a "
                              f"run's checkpoints/ directory{example}.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Runs write them to <run dir>/checkpoints/*.ckpt.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated file, not a torch file, or unsafe pickled objects
        raise CheckpointError(
            f"Could not read checkpoint {path} ({load_failure(err)}). "
            f"The file is corrupt, truncated or not a lightning-flows checkpoint; use another one from the "
            f"run's checkpoints/ directory."
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a lightning-flows checkpoint "
                              f"(a dict); pass a .ckpt written by `lightning-flows fit`.")
    return checkpoint


def resolve_model_class(checkpoint: dict, path: str | Path) -> type[GenerativeModel]:
    """The family a checkpoint asks for, if it is one of ours (and its fields have the types ours have);
    never imports anything."""
    requested = checkpoint.get(MODEL_CLASS_KEY)
    if requested is None or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a torch file but not a lightning-flows model checkpoint "
                              f"(no model class recorded); pass a checkpoint written by `lightning-flows fit`.")
    allowed = allowed_model_classes()
    if not isinstance(requested, str) or requested not in allowed:
        families = ", ".join(sorted(name for name in allowed if "." not in name))
        raise CheckpointError(f"{path} asks for model class {requested!r}, which is not a lightning-flows "
                              f"model; refusing to load it (checkpoints can only rebuild {families}). "
                              f"The file may have been tampered with; use a checkpoint written by "
                              f"`lightning-flows fit`.")
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        saved_options(checkpoint, path, key)
    return allowed[requested]


def saved_options(checkpoint: dict, path: str | Path, key: str = "hyper_parameters") -> dict:
    """The init arguments a checkpoint recorded under ``key``, without Lightning's private entries
    (``_class_path``, ``_instantiator``: names of code, which nothing here imports)."""
    values = checkpoint.get(key)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: its '{key}' is a {type(values).__name__}, not the dict of options a "
                              f"lightning-flows checkpoint holds; the file was edited or written by another "
                              f"program. Use a checkpoint written by `lightning-flows fit`.")
    return {k: v for k, v in values.items() if isinstance(k, str) and not k.startswith("_")}


def cli_model_config(checkpoint: dict, path: str | Path, typed: dict | None = None,
                     overridden: Iterable[str] = ()) -> dict:
    """The model config ``--ckpt_path`` adopts: ``{"class_path": <an allow-listed family>, "dict_kwargs": ...}``.

    ``dict_kwargs`` are the saved options the family's ``__init__`` takes, as plain data (a pickled
    :class:`SolverConfig` becomes its dict), so the CLI parser never sees a name it could import.
    ``overridden`` names the options the user typed on the command line (dotted: ``sampler.rtol``), whose values
    ``typed`` (the parsed model options, plain data) holds: they win over the checkpoint's (to evaluate it with a
    tighter solver, say). One that changes the weights' shapes is refused when the weights load, mismatch named.
    """
    cls = resolve_model_class(checkpoint, path)
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    plain = lambda value: (dataclasses.asdict(value)  # noqa: E731
                           if dataclasses.is_dataclass(value) and not isinstance(value, type) else value)
    kwargs = {key: plain(value) for key, value in saved_options(checkpoint, path).items()
              if key != "self" and (takes_any or key in parameters)}
    for dotted in overridden:
        target, source, keys = kwargs, typed or {}, dotted.split(".")
        for depth, key in enumerate(keys):
            if key not in source:
                break
            if depth == len(keys) - 1 or not isinstance(target.get(key), dict) or not isinstance(source[key], dict):
                target[key] = source[key]  # the typed leaf, or the whole option where the saved one is no dict
                break
            target, source = target[key], source[key]
    return {"class_path": model_class_name(cls), "dict_kwargs": kwargs}


def evaluation_weights(checkpoint: dict) -> dict:
    """The weights to sample and evaluate with: the EMA weights when the run kept them (EMACallback)."""
    return checkpoint.get("ema_state_dict") or checkpoint["state_dict"]


def read_checkpoint_for(path: str | Path, model: GenerativeModel | None = None, map_location="cpu") -> dict:
    """Read a checkpoint for ``--ckpt_path`` (resume, validate, test): safely, and only if it fits ``model``.

    Refuses, with the fix in the message, a file that cannot be read safely, that names no family of
    ours, that was written by another family, or whose weights have other names or shapes (another config).
    """
    checkpoint = read_checkpoint(path, map_location)
    cls = resolve_model_class(checkpoint, path)
    if model is None:
        return checkpoint
    if cls is not type(model):
        raise CheckpointError(f"{path} was written by a {cls.__name__} run, but this run trains "
                              f"{type(model).__name__}; pass a checkpoint of the same family and config "
                              f"to --ckpt_path, or drop --ckpt_path to start afresh.")
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in checkpoint["state_dict"].items()}
    problems = [f"missing {name}" for name in expected if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name}: {found[name]} in the file, {shape} in this model"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"{path} holds {cls.__name__} weights of another configuration ({shown}). Resume "
                              f"with the config and model options of the run that wrote it (its config.yaml "
                              f"sits in the run directory; a model option typed on the command line replaces "
                              f"the checkpoint's), or drop --ckpt_path to start afresh.")
    return checkpoint


def load_model_and_data(path: str | Path, map_location="cpu") -> tuple[GenerativeModel, GenerativeDataModule]:
    """Rebuild the model (EMA weights if present, eval mode) and its DataModule from one checkpoint."""
    checkpoint = read_checkpoint(path, map_location)
    cls = resolve_model_class(checkpoint, path)
    try:
        datamodule = GenerativeDataModule(**saved_options(checkpoint, path, "datamodule_hyper_parameters"))
        # The saved hyperparameters hold the data facts the model was trained with (shape, levels);
        # facts a checkpoint predates come from its DataModule, and contradictions are refused.
        model = cls(**fill_data_facts(cls, saved_options(checkpoint, path), datamodule))
        # Sampling and evaluation use the EMA weights whenever the run kept them (EMACallback).
        model.load_state_dict(evaluation_weights(checkpoint))
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"{path} could not rebuild {cls.__name__} and its data "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); the checkpoint was "
                              f"written by an incompatible version or edited. Retrain, or load it with the "
                              f"lightning-flows version that wrote it.") from err
    model.to(map_location).eval()
    return model, datamodule
