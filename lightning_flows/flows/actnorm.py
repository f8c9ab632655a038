"""ActNorm (Glow): a per-channel affine map ``z = (x + bias) * exp(log_scale)`` whose parameters are
initialised from data so that the first batch leaves it with zero mean and unit variance per channel.

Correct under data parallelism: the initialising statistics are the *global* batch's, obtained by
all-reducing per-rank sums (count, sum x, sum x^2) when ``torch.distributed`` is initialised, so every
rank computes bit-identical parameters even though each sees a different shard. The ``initialized``
flag is a persistent buffer: it travels with ``state_dict``/checkpoints, so a resumed or loaded model
never re-initialises (and a fresh model loading a trained state_dict adopts the trained flag). A Python
copy of the flag is what ``forward`` reads, so an initialised layer never reads a tensor on the host (on a
GPU that would wait for the device at every forward pass); it is refreshed whenever a state_dict is
loaded, and while it is False the buffer is consulted too (it may have been set by a copy into it).

Initialisation happens on the first forward call *in training mode* (every DDP rank makes it, in
step); in eval mode an uninitialised ActNorm is the identity, so validation/sampling before training
never triggers a collective on a subset of ranks. A batch with non-finite statistics is not used for
initialisation (the layer stays uninitialised until a finite batch arrives), so a NaN batch cannot
poison the parameters outside the optimizer's reach (see :class:`lightning_flows.callbacks.NonFiniteGuard`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_flows.flows.base import Bijection


def _global_channel_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance per channel (dim 1) over every rank's batch: ``(B, C, ...) -> (C,), (C,)``."""
    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
    stats = torch.cat([flat.new_full((1,), flat.shape[1]), flat.sum(1), flat.pow(2).sum(1)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    count, total, total_sq = stats[0], stats[1:1 + x.shape[1]], stats[1 + x.shape[1]:]
    mean = total / count
    var = (total_sq / count - mean.pow(2)).clamp_min(0.0)
    return mean, var


class ActNorm(Bijection):
    """Per-channel affine bijection for ``x: (B, C)`` or ``(B, C, H, W)``; ``log|det| = H*W*sum(log_scale)``.

    Args:
        channels: ``C``.
        eps: added to the standard deviation at initialisation (constant channels stay finite).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False  # host copy of the buffer, read by forward
        self.eps = eps

    def _view(self, p: Tensor, x: Tensor) -> Tensor:
        return p.view(1, -1, *([1] * (x.ndim - 2)))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias/log_scale from ``x`` (globally across DDP ranks) and mark the layer initialised."""
        mean, var = _global_channel_moments(x)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            # A NaN/inf batch must not become the parameters; every rank sees the same reduced
            # statistics, so all of them skip together and retry on the next batch.
            return
        self.bias.copy_((-mean).to(self.bias.dtype))
        self.log_scale.copy_((-torch.log(var.sqrt() + self.eps)).to(self.log_scale.dtype))
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = bool(self.initialized)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not self._initialized:
            self._initialized = bool(self.initialized)  # e.g. copied in by an EMA swap or a DDP broadcast
            if not self._initialized:
                self.initialize(x)
        z = (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x))
        pixels = x[0, 0].numel()  # H*W for images, 1 for vectors
        return z, (self.log_scale.sum() * pixels).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return z * torch.exp(-self._view(self.log_scale, z)) - self._view(self.bias, z)


__all__ = ["ActNorm"]
