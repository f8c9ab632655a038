"""Bits/dim of the validation or test split, from the model's ``log_prob``, DDP-correct.

Logged as ``<stage>/bpd_exact`` or ``<stage>/bpd_bound`` after the model's declared ``likelihood``
(the lecture table's column), and not at all for ``likelihood = "none"``: an absent number cannot
be mistaken for a measured one. The NLL comes from the same batches the validation/test loop
already serves (each example exactly once across ranks, with the DataModule's fixed evaluation
dequantisation noise); ranks add up nats and example counts, and the mean is taken once, over all
examples (a mean of per-rank means would weight ranks with fewer examples too heavily). The
conversion to bits/dim is the DataModule's, i.e. the single shared formula.
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_flows.callbacks.sampling_cost import should_evaluate
from lightning_flows.metrics.distributed import sum_across_ranks


class BitsPerDimCallback(L.Callback):
    """Accumulate ``-log_prob`` over the evaluation batches and log bits/dim at epoch end.

    Args:
        every_n_epochs: evaluate every n-th validation epoch (0: only at test). ``log_prob`` of an
            ODE model is costly, so a larger value is common.
        on_test: also evaluate during ``trainer.test``.
    """

    def __init__(self, every_n_epochs: int = 1, on_test: bool = True):
        super().__init__()
        self.every_n_epochs, self.on_test = every_n_epochs, on_test
        self._active = False
        self._nats = 0.0
        self._count = 0
        self.last_logged: dict[str, float] = {}

    @staticmethod
    def has_likelihood(pl_module) -> bool:
        return getattr(pl_module, "likelihood", "none") in ("exact", "bound")

    # ---- validation ----
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start(should_evaluate(trainer, self.every_n_epochs) and self.has_likelihood(pl_module))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._accumulate(pl_module, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    # ---- test ----
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._start(self.on_test and self.has_likelihood(pl_module))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._accumulate(pl_module, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")

    # ---- the accumulation ----
    def _start(self, active: bool) -> None:
        self._active, self._nats, self._count = active, 0.0, 0

    def _accumulate(self, pl_module, batch) -> None:
        if not self._active:
            return
        # Lightning evaluates under inference mode, where no autograd is possible; families whose
        # log_prob needs gradients (divergence of a CNF) enable them themselves, so leave inference
        # mode but keep gradients off. The clone makes the batch an ordinary tensor.
        with torch.inference_mode(False), torch.no_grad():
            x = batch.clone()
            log_prob = pl_module.log_prob(x)
        if log_prob.shape != (x.shape[0],):
            raise ValueError(f"{type(pl_module).__name__}.log_prob returned shape {tuple(log_prob.shape)} for a "
                             f"batch of {x.shape[0]}; it must return one log-density per example, (B,).")
        self._nats += -log_prob.detach().double().sum().item()
        self._count += x.shape[0]

    def _finish(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if not self._active:
            return
        self._active = False
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("BitsPerDimCallback needs the GenerativeDataModule (its quantisation) to "
                               "convert nats to bits/dim: pass trainer.fit(model, datamodule=dm).")
        totals = sum_across_ranks(torch.tensor([self._nats, float(self._count)], dtype=torch.float64),
                                  pl_module.device)
        nats, count = totals[0].item(), int(round(totals[1].item()))
        if count == 0:
            return
        bpd = float(datamodule.bits_per_dim(nats / count))
        name = f"{stage}/bpd_{pl_module.likelihood}"
        pl_module.log(name, bpd, sync_dist=False)  # identical on every rank already
        pl_module.log(f"{stage}/bpd_examples", float(count), sync_dist=False)
        self.last_logged = {name: bpd, f"{stage}/bpd_examples": float(count)}
