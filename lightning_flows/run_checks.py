"""Checks a run makes before it starts, so that a mistake costs seconds, not a night of training.

Each failure is a :class:`RunSetupError` that names the setting and how to fix it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn


class RunSetupError(ValueError):
    """A run that cannot work as configured, with the fix in the message."""


def _requested_device_count(devices: Any) -> int | None:
    """How many devices ``--trainer.devices`` asks for (None: 'auto' / -1, i.e. all there are)."""
    if isinstance(devices, str):
        devices = devices.strip()
        if devices in ("auto", "-1"):
            return None
        if "," in devices:  # "0,1": device indices
            indices = [int(i) for i in devices.split(",") if i.strip()]
            return max(indices) + 1 if indices else None
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        return max(int(i) for i in devices) + 1 if devices else None
    if isinstance(devices, int):
        return None if devices == -1 else devices
    return None


def check_devices_exist(accelerator: Any, devices: Any) -> None:
    """Refuse more GPUs (or MPS devices) than the machine has, before Lightning fails further down."""
    if not isinstance(accelerator, str):
        return  # an Accelerator instance: its owner knows what it does
    accelerator = accelerator.lower()
    requested = _requested_device_count(devices)
    if requested is None:
        return
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        kind, available = "CUDA GPU", torch.cuda.device_count()
    elif accelerator == "mps":
        kind, available = "MPS device", int(torch.backends.mps.is_available())
    else:
        return  # CPU "devices" are processes, not hardware
    if requested > available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None and kind == "CUDA GPU" else ""
        raise RunSetupError(
            f"--trainer.devices {devices} asks for {requested} {kind}(s) but this machine has {available}{note}. "
            f"Lower --trainer.devices (at most {available}), or train on processes with "
            f"--trainer.accelerator cpu --trainer.devices N.")


def check_training_budget(trainer) -> None:
    """``fit`` must train at least one step: ``max_steps`` / ``max_epochs`` are -1 (no limit), None or >= 1.

    (0 would save an untrained model as the run's result and exit as if all went well; Lightning refuses
    other negative values only after the run directory exists, with a traceback.)
    """
    for option, meaning in (("max_steps", "optimizer steps"), ("max_epochs", "epochs")):
        value = trainer.get(option)
        if value is None or value == -1 or (isinstance(value, int) and value >= 1):
            continue
        reason = "would train nothing and save an untrained model" if value == 0 else "is not a number of " + meaning
        raise RunSetupError(f"--trainer.{option} {value} {reason}: pass how many {meaning} to train (>= 1), or -1 "
                            f"for no limit on {meaning} (the run then stops by the other limits).")


def check_batch_sizes(data) -> None:
    """Every batch size of the DataModule (``--data.batch_size``, ``--data.eval_batch_size``) is >= 1."""
    if data is None:
        return
    for option in ("batch_size", "eval_batch_size"):
        value = data.get(option) if hasattr(data, "get") else getattr(data, option, None)
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise RunSetupError(f"--data.{option} {value}: a batch holds at least one example; pass a batch size "
                                f">= 1.")


def _output_dirs(config) -> list[tuple[str, str]]:
    """(directory, the option that sets it) for everything a run writes."""
    trainer = config.trainer
    dirs = [(trainer.default_root_dir or os.getcwd(), "--trainer.default_root_dir")]
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        save_dir = getattr(init_args, "save_dir", None) if init_args is not None else None
        if save_dir:
            dirs.append((save_dir, "--trainer.logger.init_args.save_dir"))
    checkpoint = getattr(config, "checkpoint", None)
    if checkpoint is not None and getattr(checkpoint, "dirpath", None):
        dirs.append((checkpoint.dirpath, "--checkpoint.dirpath"))
    return [(str(d), option) for d, option in dirs if "://" not in str(d)]  # remote storage: not checked


def unwritable_reason(directory: str | Path) -> str | None:
    """Create ``directory`` if needed and write (then remove) a file in it: None if that works, else why not."""
    directory = Path(directory)
    probe = directory / f".lightning_flows_write_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def check_writable(directory: str | Path, option: str,
                   consequence: str = "this run would lose its checkpoints, logs and samples there",
                   fix: str | None = None) -> None:
    """``directory`` exists or can be made, and is writable; a clear error naming ``option`` (or ``fix``) if not."""
    reason = unwritable_reason(directory)
    if reason is not None:
        raise RunSetupError(f"Cannot write to {directory} ({reason}); {consequence}. "
                            f"{fix or f'Pass a writable directory with {option} DIR.'}")


def check_output_dirs_writable(config) -> None:
    """Every directory the run will write to (root, logger, checkpoints) exists or can be made, and is writable."""
    for directory, option in _output_dirs(config):
        check_writable(directory, option)


def _hpc_checkpoint(config) -> str:
    """The file Lightning's ``--ckpt_path hpc`` means: the highest ``<default_root_dir>/hpc_ckpt_<n>.ckpt``."""
    root = Path(config.trainer.default_root_dir or os.getcwd())
    versions = {int(p.stem[len("hpc_ckpt_"):]): p for p in root.glob("hpc_ckpt_*.ckpt")
                if p.stem[len("hpc_ckpt_"):].isdigit()}
    if not versions:
        raise RunSetupError(f"--ckpt_path hpc: there is no hpc_ckpt_<n>.ckpt (Lightning's SLURM requeue checkpoint) in "
                            f"{root}. Pass a checkpoint file, or `last` for the newest checkpoint of this experiment.")
    return str(versions[max(versions)])


def check_ckpt_path(config, typed: list[str] | tuple[str, ...] = ()) -> dict | None:
    """Resolve and read ``--ckpt_path`` before anything uses it: safely, and only if it holds the configured family.

    Every value ends as a local file read by :func:`lightning_flows.checkpoints.read_checkpoint` (``weights_only``,
    our families only): a path or symlink, a ``file://`` URL (``config.ckpt_path`` becomes its path) and ``hpc``
    (the file it names) are read here; remote URLs and ``registry:`` names are refused (download them first), and
    ``best`` too (it only means something inside the process that trained). ``last`` is resolved by the trainer
    (:class:`~lightning_flows.callbacks.checkpointing.RunCheckpoint` picks among the experiment's checkpoints) and
    read through :class:`~lightning_flows.callbacks.checkpointing.AtomicCheckpointIO`, the same reader.

    Returns the checkpoint read (``None`` for ``last``). Lightning's CLI (from 2.5.5) then replaces the config
    file's model options by the checkpoint's (the weights only fit the architecture they were trained with); a
    warning lists the options that change. Options ``typed`` on the command line (dotted names below
    ``init_args``) keep their value and are not listed. (Older versions build the configured model, and loading
    refuses weights of another configuration.)
    """
    from lightning_flows.checkpoints import (CheckpointError, local_checkpoint_path, read_checkpoint,
                                             resolve_model_class, saved_options)

    path = str(config.ckpt_path)
    if path == "last":
        return None
    if path == "best":
        raise RunSetupError("--ckpt_path best means the best checkpoint of a fit run earlier in the same Python "
                            "process; a command starts a fresh one, so there is none. Pass the checkpoint file "
                            "(<run dir>/checkpoints/*.ckpt), or `last` for the newest one of this experiment.")
    if path == "hpc":
        path = _hpc_checkpoint(config)
    local = str(local_checkpoint_path(path))
    config.ckpt_path = local  # what the trainer loads: the file checked here, never a URL
    checkpoint = read_checkpoint(local)
    cls = resolve_model_class(checkpoint, local)
    configured = str(config.model.class_path) if config.get("model") is not None else ""
    if configured and configured.rpartition(".")[2] != cls.__name__:
        raise CheckpointError(f"{local} was written by a {cls.__name__} run, but this run trains "
                              f"{configured.rpartition('.')[2]}; pass a checkpoint of the same family and config "
                              f"to --ckpt_path, or drop --ckpt_path to start afresh.")
    from lightning.pytorch.cli import LightningCLI

    if not hasattr(LightningCLI, "_parse_ckpt_path"):
        return checkpoint
    saved = saved_options(checkpoint, local)
    init_args = config.model.get("init_args") if configured else None
    given = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args or {})
    on_command_line = {option.split(".")[0] for option in typed}
    changed = [f"{key}={saved[key]!r} (config: {given[key]!r})" for key in given
               if key in saved and key not in on_command_line and key != "data_shape"
               and isinstance(given[key], (bool, int, float, str)) and given[key] != saved[key]]
    if changed:
        rank_zero_warn(f"--ckpt_path {local}: the checkpoint's model options replace the config's, since its weights "
                       f"need them: {', '.join(changed)}.")
    return checkpoint
