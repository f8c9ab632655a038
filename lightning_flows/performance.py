"""Speed switches for any family, in one callback, and the precision rules likelihoods follow.

:class:`PerformanceOptions` is on every CLI run as ``--performance.*`` (bf16 itself is Lightning's
``--trainer.precision bf16-mixed``):

* ``fused_adam``: fused torch optimizers (one kernel per step for all parameters; with it the
  :class:`~lightning_flows.callbacks.NonFiniteGuard` skips bad steps without a host sync). ``auto`` = on
  CUDA, off on the CPU (where the foreach path is as fast). Applied to every optimizer a family builds
  whose parameter groups have a ``fused`` flag (Adam, AdamW, SGD, ...), before the first step.
* ``tf32``: TensorFloat-32 matmuls and convolutions on CUDA (Ampere and newer), for training and
  sampling. Likelihoods are always computed without it (see :func:`full_precision`).
* ``channels_last``: NHWC weights for image models (tensor-core convolutions read NHWC natively).
* ``compile``: ``torch.compile`` of the backbones (opt-in): the outermost modules of the shared network
  classes (UNet, MLPs, coupling conditioners, ODE fields, encoders/decoders), or the attributes named in
  ``compile_modules``. ``nn.Module.compile`` compiles in place, so parameter names and checkpoints are
  unchanged. Compilation costs tens of seconds up front (minutes on a busy CPU).

Precision rule: log-likelihoods (ODE likelihood solves, exact flows' log-determinants) are computed in
float32 whatever the training precision: :func:`full_precision` turns autocast and TF32 off around
every ODE likelihood solve and around the evaluator's likelihood pass. A family's own ``val/loss`` is
its training objective and follows the trainer's precision.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

FUSED_CHOICES = ("auto", "true", "false")


# ---- precision ----
@contextlib.contextmanager
def full_precision(device_type: str | None = None) -> Iterator[None]:
    """Run the block in true float32: no autocast (CPU and ``device_type``), no TF32 matmuls/convolutions.

    Used around likelihood computations, so that a bpd never depends on the training precision.
    Inputs that arrive in a reduced precision stay so; callers pass float32 data.
    """
    matmul = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    device_types = {"cpu"} | ({device_type} if device_type and device_type != "cpu" else set())
    if torch.cuda.is_available():
        device_types.add("cuda")
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with contextlib.ExitStack() as stack:
            for kind in sorted(device_types):
                stack.enter_context(torch.autocast(kind, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


# ---- logging cadence ----
def logs_this_step(trainer) -> bool:
    """True on the training steps whose on-step metrics the logger writes (every ``log_every_n_steps``), and
    on a run's first step (so that the progress bar shows a loss at once).

    Lightning drops on-step values logged on the other steps (the progress bar shows the last one), yet
    each ``self.log`` still costs its bookkeeping; callers skip logging when this is False. Outside a
    trainer (or when Lightning's internals differ) it answers True.
    """
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:
        return True
    try:
        # The first batch by batches, not optimizer steps: a GAN logs after both of its steps (global_step 2).
        return bool(connector.should_update_logs) or trainer.fit_loop.epoch_loop._batches_that_stepped == 0
    except Exception:  # noqa: BLE001 - a future Lightning may restructure this; logging every step is safe
        return True


# ---- fused optimizers ----
def enable_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Switch ``optimizer`` (Adam, AdamW, SGD, ... built unfused) to its fused kernel in place.

    Equivalent to having built it with ``fused=True``: the same validity checks (floating-point
    parameters on a device with fused kernels, not differentiable, not forced to ``foreach``), and step
    counters that already exist (a resumed optimizer) move to the parameter's device as float32, where
    the fused kernel keeps them. Returns whether the optimizer is now fused.
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    groups = optimizer.param_groups
    if not groups or any("fused" not in g for g in groups):
        return False
    if all(g["fused"] for g in groups):
        return True
    supported = _get_fused_kernels_supported_devices()
    params = [p for g in groups for p in g["params"]]
    if any(g.get("differentiable") or g.get("foreach") for g in groups) or not all(
            p.device.type in supported and torch.is_floating_point(p) for p in params):
        return False
    for group in groups:
        group["fused"] = True
    optimizer.defaults["fused"] = True
    for p in params:
        state = optimizer.state.get(p, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    return True


# ---- torch.compile ----
def backbone_classes() -> tuple[type, ...]:
    """The shared network classes that are worth compiling (each call is a whole network)."""
    from lightning_flows.flows.coupling import ConvConditioner, MLPConditioner
    from lightning_flows.nn import FlatTimeMLP, TimeMLP, TimeUNet
    from lightning_flows.nn.dcgan import ConvDecoder, ConvEncoder
    from lightning_flows.nn.ode_functions import ConcatConvField, ConcatSquashMLP

    return (TimeUNet, FlatTimeMLP, TimeMLP, ConcatSquashMLP, ConcatConvField, ConvEncoder, ConvDecoder,
            MLPConditioner, ConvConditioner)


def compile_targets(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` to compile: the attributes ``names``, else the outermost backbone modules."""
    if names:
        missing = [n for n in names if not _has(model, n)]
        if missing:
            raise ValueError(f"compile_modules names {missing}, which {type(model).__name__} does not have; its "
                             f"modules are: {', '.join(n for n, _ in model.named_children())}.")
        return [(n, model.get_submodule(n)) for n in names]
    classes = backbone_classes()
    targets: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, classes) and not any(name.startswith(t + ".") for t, _ in targets):
            targets.append((name, module))
    return targets


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def inductor_unavailable(device_type: str) -> str | None:
    """Why torch.compile's default backend cannot run on ``device_type`` here, or None when it can."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor on CUDA needs triton, which is not installed"
        return None
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang", "clang++")):
        return "inductor on the CPU needs a C++ compiler (none of cc/gcc/g++/clang found)"
    return None


# ---- the callback ----
class PerformanceOptions(L.Callback):
    """Apply the speed switches to the model being trained (see the module docstring).

    Args:
        fused_adam: ``auto`` (on for CUDA), ``true`` or ``false``.
        tf32: allow TF32 matmuls and convolutions on CUDA.
        channels_last: NHWC memory format for image models.
        compile: ``torch.compile`` the backbones.
        compile_modules: attribute names to compile instead of the automatic choice (e.g. ``[velocity]``).
        compile_mode: ``torch.compile``'s ``mode`` (``default``, ``reduce-overhead``, ``max-autotune``).
        compile_backend: ``torch.compile``'s backend (``inductor``; ``eager`` only traces, for testing).
    """

    def __init__(self, fused_adam: str = "auto", tf32: bool = True, channels_last: bool = False,
                 compile: bool = False, compile_modules: list[str] | None = None, compile_mode: str = "default",
                 compile_backend: str = "inductor"):
        super().__init__()
        fused_adam = str(fused_adam).lower()
        if fused_adam not in FUSED_CHOICES:
            raise ValueError(f"fused_adam must be one of {', '.join(FUSED_CHOICES)}, got '{fused_adam}'.")
        self.fused_adam, self.tf32, self.channels_last = fused_adam, tf32, channels_last
        self.compile, self.compile_modules = compile, list(compile_modules or [])
        self.compile_mode, self.compile_backend = compile_mode, compile_backend
        self.compiled: list[str] = []
        self.fused_optimizers = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device_type = trainer.strategy.root_device.type
        if self.tf32 and device_type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        if self.channels_last and len(getattr(pl_module, "data_shape", ())) == 3:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile and not self.compiled:
            self._compile(pl_module, device_type)

    def _compile(self, pl_module: nn.Module, device_type: str) -> None:
        if self.compile_backend == "inductor" and (reason := inductor_unavailable(device_type)):
            rank_zero_warn(f"performance.compile is on but {reason}; training without torch.compile.")
            return
        for name, module in compile_targets(pl_module, self.compile_modules):
            module.compile(mode=None if self.compile_mode == "default" else self.compile_mode,
                           backend=self.compile_backend)
            self.compiled.append(name)
        rank_zero_info(f"torch.compile ({self.compile_backend}): {', '.join(self.compiled) or 'nothing to compile'}")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the optimizers exist and any resumed state is loaded, before the first step.
        use = self.fused_adam == "true" or (self.fused_adam == "auto" and trainer.strategy.root_device.type == "cuda")
        if not use:
            return
        for optimizer in trainer.optimizers:
            self.fused_optimizers += enable_fused(optimizer)
        if self.fused_adam == "true" and self.fused_optimizers < len(trainer.optimizers):
            rank_zero_warn(f"performance.fused_adam: {len(trainer.optimizers) - self.fused_optimizers} optimizer(s) "
                           f"have no fused kernel for these parameters and stay unfused.")
