"""Checkpoints that survive any stop: written atomically, always a ``last.ckpt``, checked on resume.

:class:`AtomicCheckpointIO` writes every checkpoint to a temporary file *in the target's directory*,
fsyncs it and renames it over the target (``os.replace`` is atomic on POSIX), so a crash, SIGKILL or
full disk during a save leaves the previous file intact. (Lightning's own writer stages the file in
the system temp directory and *moves* it, which is a copy when that is another filesystem -- the
usual case for a run directory on a cluster's shared storage.) Loading goes through
:func:`lightning_flows.checkpoints.read_checkpoint`: ``weights_only=True`` and errors that name the
file and the fix, plus a check that the file belongs to the family being trained.

:class:`RunCheckpoint` is the ``ModelCheckpoint`` of every ``lightning-flows fit``:

* it saves ``last.ckpt`` whenever training stops: ``max_steps``, ``max_epochs``, ``max_time``, early
  stopping, the non-finite guard (all end through ``on_train_end``), and SIGTERM (SLURM preemption) or a
  first Ctrl-C, which request a stop that every DDP rank honours after the same batch (a second Ctrl-C
  aborts at once, saving nothing), so no stop lands mid-step;
* after saving it draws the final sample grid (:class:`SampleGridCallback`) from the checkpoint's
  evaluation weights (EMA when kept), i.e. exactly what ``lightning-flows sample`` would draw;
* during training it saves every 1000 optimizer steps unless another trigger is given (a step count
  needs no collective; Lightning's ``train_time_interval`` broadcasts rank 0's clock after every batch);
* checkpoints go to ``<run dir>/checkpoints/`` whatever the logger (:func:`run_dir`);
* ``--ckpt_path last`` resumes from the furthest-trained complete checkpoint (``last.ckpt`` or periodic) among
  *all* versions of the experiment (``<root>/<name>/*/checkpoints``): a restarted run writes a new version
  directory, and a run killed mid-save leaves an older ``last.ckpt`` beside a newer periodic one.
"""

from __future__ import annotations

import os
import signal
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_flows.callbacks.run_directory import experiment_dir, run_dir
from lightning_flows.callbacks.sample_grid import SampleGridCallback

DEFAULT_EVERY_N_TRAIN_STEPS = 1000
# Under DDP, how often (in batches) the ranks agree on whether a signal asked them to stop: a tiny
# all-reduce, but also a host-device sync, so not after every batch.
STOP_CHECK_EVERY_N_BATCHES = 10


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # os.open with 0o666 lets the umask decide the final permissions, as for any new file.
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    remove_stale_temporaries(path.parent, path.name)


def _writer_alive(temporary: Path) -> bool:
    """Whether the process that writes ``temporary`` (``.<name>.<pid>.<hex>.tmp``) still runs on this machine."""
    pid = temporary.name[: -len(".tmp")].rsplit(".", 2)[-2]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str | Path, name: str = "*.ckpt") -> list[Path]:
    """Delete the temporary files :func:`atomic_torch_save` left in ``directory`` for targets matching ``name``
    when their writer was killed mid-save (SIGKILL, power loss, OOM): those whose process is gone.
    A live writer's file is left alone. Returns the files removed."""
    removed = []
    for temporary in Path(directory).glob(f".{name}.*.tmp"):
        if not _writer_alive(temporary):
            temporary.unlink(missing_ok=True)
            removed.append(temporary)
    return removed


def checkpoint_progress(path: str | Path) -> tuple[int, int] | None:
    """``(global_step, epoch)`` stored in the checkpoint at ``path``, or None when it cannot be read (a copy
    cut short, another program's file, anything the safe reader refuses). Memory-maps the file: the weights
    are not read."""
    from lightning_flows.checkpoints import CheckpointError, read_checkpoint

    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except CheckpointError:
        return None
    step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch", 0)
    if not isinstance(step, int) or not isinstance(epoch, int):
        return None
    return step, epoch


def furthest_checkpoint(paths) -> Path | None:
    """The complete checkpoint among ``paths`` that trained furthest: the most optimizer steps, then epochs,
    then the latest modification. Raises :class:`~lightning_flows.checkpoints.CheckpointError` (the newest
    file's) when there are files but none can be read. (By progress, not by time alone: copying or syncing a
    run directory resets modification times, while within a run the step count only grows.)"""
    from lightning_flows.checkpoints import read_checkpoint

    paths = [Path(p) for p in paths if Path(p).is_file()]
    progress = {path: checkpoint_progress(path) for path in paths}
    readable = {path: (*found, path.stat().st_mtime) for path, found in progress.items() if found is not None}
    if readable and len(readable) < len(paths):
        rank_zero_warn(f"Skipping checkpoints that cannot be read: "
                       f"{', '.join(str(p) for p, found in progress.items() if found is None)}.")
    if readable:
        return max(readable, key=readable.get)
    if paths:
        read_checkpoint(max(paths, key=lambda p: p.stat().st_mtime))  # raises its error, naming the file
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic local checkpoint writes (remote ``scheme://`` paths: Lightning's writer) and safe, checked reads
    of local files only (:func:`lightning_flows.checkpoints.read_checkpoint`).

    Args:
        model: when set (``RunCheckpoint`` sets it to the model being trained), a checkpoint of another
            family or configuration is refused with a clear message before Lightning loads its weights.
    """

    def __init__(self, model: L.LightningModule | None = None):
        super().__init__()
        self.model = model

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None, **kwargs) -> dict:
        # Always our reader (weights_only=True, our families only), whatever `weights_only` the caller passes:
        # a file:// URL is read as its local file, any other URL is refused (never Lightning's remote loader,
        # which unpickles URLs with weights_only=False).
        from lightning_flows.checkpoints import read_checkpoint_for

        return read_checkpoint_for(path, self.model, map_location=map_location if map_location is not None else "cpu")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with ``last.ckpt`` on every stop, atomic writes and a final sample grid.

    Takes every ``ModelCheckpoint`` argument. Differences: ``save_last`` defaults to True, and without
    any of ``every_n_train_steps`` / ``every_n_epochs`` / ``train_time_interval`` it saves every 1000
    optimizer steps (instead of after each validation, which configs run only every few epochs).
    """

    def __init__(self, *args, save_last: bool | None = True, every_n_train_steps: int | None = None,
                 train_time_interval: timedelta | None = None, every_n_epochs: int | None = None, **kwargs):
        if every_n_train_steps is None and train_time_interval is None and every_n_epochs is None:
            every_n_train_steps = DEFAULT_EVERY_N_TRAIN_STEPS
        super().__init__(*args, save_last=save_last, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs, **kwargs)
        # setup() fills in dirpath from the logger; remember whether the user chose it.
        self._dirpath_given = self.dirpath is not None
        self._previous_handlers: dict[int, Any] = {}
        self._stop_requested_by: str | None = None
        self._stopped_by_signal = False

    @property
    def stopped_by_signal(self) -> bool:
        """Whether the last fit ended early because of SIGTERM or Ctrl-C (the benchmark then stops its suite)."""
        return self._stopped_by_signal

    # ---- atomic, checked checkpoint files for the whole trainer ----
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self._dirpath_given:
            # In the run directory whatever the logger (Lightning's default puts a wandb run's checkpoints
            # in <save_dir>/<project>/<id>/). Rank zero's choice is broadcast by ModelCheckpoint.setup.
            self.dirpath = str(run_dir(trainer) / "checkpoints")
        super().setup(trainer, pl_module, stage)
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:  # leave a user's own CheckpointIO plugin alone
            io = trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(io, AtomicCheckpointIO):
            io.model = pl_module

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.monitor is None and state_dict.get("dirpath", self.dirpath) != self.dirpath:
            # A resumed or tested run writes to a run directory of its own by design, and without a monitored
            # metric there is no best-k ranking to carry over: Lightning's "dirpath has changed ... won't be
            # reloaded" warning would be noise. What it does reload, it reloads here too.
            self.best_model_path = state_dict["best_model_path"]
            return
        super().load_state_dict(state_dict)

    # ---- last.ckpt on every stop ----
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_requested_by = None
        self._install_stop_handlers(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Every rank takes the same decision at the same batch (any rank signalled -> all stop), so
        # training ends through on_train_end everywhere and the final save is an ordinary collective one.
        requested = self._stop_requested_by is not None
        if trainer.world_size > 1:
            if (batch_idx + 1) % STOP_CHECK_EVERY_N_BATCHES:
                return
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested and not trainer.should_stop:
            self._stopped_by_signal = True
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_signal_handlers()
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        # Every rank is here (training ended normally), so the collective save is safe.
        path = self._last_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self.last_model_path = path
        if self._stopped_by_signal:
            rank_zero_info(f"Stopped by a signal at global step {trainer.global_step}; saved {path}. "
                           f"Resume with --ckpt_path last (or {path}).")
        self._final_samples(trainer, pl_module, path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_signal_handlers()
        # SIGTERMException: a SIGTERM before our handlers were installed (setup, sanity check), which
        # Lightning turns into a stop at a batch boundary. Any other exception may have struck
        # mid-step: keep the last good checkpoint rather than overwrite it.
        if not isinstance(exception, SIGTERMException) or trainer.fast_dev_run:
            return
        # Ranks may not reach this point together, so no collective: rank 0 holds the same weights
        # as every rank and writes the file alone.
        path = self._last_path(trainer)
        if trainer.is_global_zero:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
            rank_zero_info(f"Stopped by a signal at global step {trainer.global_step}; saved {path}. "
                           f"Resume with --ckpt_path last (or {path}).")
        self.last_model_path = path
        self._final_samples(trainer, pl_module, path)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_signal_handlers()

    def _last_path(self, trainer: L.Trainer) -> str:
        dirpath = self.dirpath or self._checkpoint_dirs(trainer)[0]
        return os.path.join(dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    @staticmethod
    def _final_samples(trainer: L.Trainer, pl_module: L.LightningModule, path: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, SampleGridCallback):
                callback.draw_final(trainer, pl_module, path)

    # ---- SIGTERM / Ctrl-C: stop every rank at the same batch boundary ----
    def _install_stop_handlers(self, trainer: L.Trainer) -> None:
        """While training, SIGTERM and a first Ctrl-C only *request* a stop, honoured after the batch.

        They replace Lightning's own SIGTERM handler for the duration of training: that one raises on
        each rank as soon as *its* copy of the signal arrives, so under DDP the ranks can leave at
        different batches, with collectives left unmatched (one rank then hangs or reads garbage).
        """
        if os.name != "posix":
            return

        def request_stop(signum, frame):
            # No need to forward the signal to other ranks: the request is all-reduced after each batch.
            self._stop_requested_by = signal.Signals(signum).name
            if signum == signal.SIGINT:
                # A second Ctrl-C aborts at once (KeyboardInterrupt, nothing saved).
                signal.signal(signal.SIGINT, self._previous_handlers.get(signal.SIGINT, signal.default_int_handler))
                rank_zero_info("\nCtrl-C: stopping after this batch and saving last.ckpt (Ctrl-C again to abort).")

        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(signum)
                signal.signal(signum, request_stop)
            except ValueError:  # not the main thread: leave signals to Lightning
                continue
            self._previous_handlers[signum] = previous

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            try:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous_handlers = {}

    # ---- `--ckpt_path last` across the versions of one experiment ----
    def _checkpoint_dirs(self, trainer: L.Trainer) -> list[str]:
        """This run's checkpoint directory first, then those of the experiment's other versions."""
        if self._dirpath_given:
            return [str(self.dirpath)]
        own = run_dir(trainer) / "checkpoints"
        experiment = experiment_dir(trainer)
        others = sorted(str(p) for p in experiment.glob("*/checkpoints") if p != own) if experiment else []
        return [str(own), *others]

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """What ``--ckpt_path last`` resumes from: of every checkpoint (``last.ckpt`` and periodic ones) of every
        version of the experiment, the complete one that trained furthest (:func:`furthest_checkpoint`). A run
        killed while writing ``last.ckpt`` keeps the older ``last.ckpt`` beside a newer periodic checkpoint, and
        a half-written temporary file, which is removed here. (Lightning then picks the newest of what this
        returns: the one file.)"""
        candidates = []
        for directory in self._checkpoint_dirs(trainer):
            remove_stale_temporaries(directory)
            candidates += Path(directory).glob("*.ckpt")
        chosen = furthest_checkpoint(candidates)
        if chosen is None:
            return set()
        step, epoch = checkpoint_progress(chosen)
        rank_zero_info(f"--ckpt_path last: {chosen} (global step {step}, epoch {epoch}), the furthest-trained of "
                       f"{len(candidates)} checkpoint(s) of this experiment.")
        return {os.path.normpath(chosen)}
