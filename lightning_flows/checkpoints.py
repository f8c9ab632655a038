"""Loading checkpoints safely (``weights_only=True``) with errors that say what to do."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.models import GenerativeModel
from lightning_flows.ode import SolverConfig

# Plain-data classes our hyperparameters may hold; allow-listed for weights_only unpickling.
SAFE_GLOBALS = [SolverConfig]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the reason and the fix."""


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Runs write them to <run dir>/checkpoints/*.ckpt.")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated file, not a torch file, or unsafe pickled objects
        raise CheckpointError(
            f"Could not read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"The file is corrupt, truncated or not a lightning-flows checkpoint; use another one from the "
            f"run's checkpoints/ directory."
        ) from err


def _import_class(qualified: str):
    module, _, name = qualified.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_model_and_data(path: str | Path, map_location="cpu") -> tuple[GenerativeModel, GenerativeDataModule]:
    """Rebuild the model (EMA weights if present, eval mode) and its DataModule from one checkpoint."""
    checkpoint = read_checkpoint(path, map_location)
    class_path = checkpoint.get("lightning_flows_model_class")
    if class_path is None or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is a torch file but not a lightning-flows model checkpoint "
                              f"(no model class recorded); pass a checkpoint written by `lightning-flows fit`.")
    cls = _import_class(class_path)
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = cls(**hparams)
    # Sampling and evaluation use the EMA weights whenever the run kept them (EMACallback).
    model.load_state_dict(checkpoint.get("ema_state_dict") or checkpoint["state_dict"])
    model.to(map_location).eval()
    data_hparams = {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items()
                    if not k.startswith("_")}
    datamodule = GenerativeDataModule(**data_hparams)
    return model, datamodule
