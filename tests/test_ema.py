"""EMA callback: closed-form averages, EMA weights at evaluation, training weights restored, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_flows.callbacks import EMACallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.models.base import GenerativeModel


class TinyModel(GenerativeModel):
    """One linear map trained by plain SGD; records what validation sees."""

    def __init__(self):
        super().__init__((2,), lr=0.1)
        self.linear = nn.Linear(2, 2)
        self.seen_in_validation: list[torch.Tensor] = []

    def training_loss(self, x):
        return (self.linear(x) - 0.5 * x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.linear.weight.detach().clone())
        return super().validation_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class WeightRecorder(L.Callback):
    """The weights after every optimiser step (plus the initial ones)."""

    def __init__(self):
        self.history: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.history.append(pl_module.linear.weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append(pl_module.linear.weight.detach().clone())


def run(steps=5, **kwargs):
    torch.manual_seed(0)
    model = TinyModel()
    trainer = L.Trainer(max_steps=steps, max_epochs=1, limit_train_batches=steps, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, GenerativeDataModule("8gaussians", batch_size=32))
    return model, trainer


def closed_form_ema(history: list[torch.Tensor], decay: float) -> torch.Tensor:
    """``decay^n theta_0 + sum_k (1 - decay) decay^(n - k) theta_k``."""
    n = len(history) - 1
    total = decay ** n * history[0]
    for k in range(1, n + 1):
        total = total + (1 - decay) * decay ** (n - k) * history[k]
    return total


def test_ema_equals_the_closed_form_and_is_used_for_validation():
    decay = 0.7
    recorder, ema = WeightRecorder(), EMACallback(decay=decay)
    model, trainer = run(callbacks=[recorder, ema])
    assert len(recorder.history) == 6
    expected = closed_form_ema(recorder.history, decay)
    torch.testing.assert_close(ema.shadow["linear.weight"], expected)
    assert not torch.allclose(expected, recorder.history[-1], atol=1e-4)  # the average really lags
    # Validation ran once, at the end of the epoch, with the EMA weights in the model...
    assert len(model.seen_in_validation) == 1
    torch.testing.assert_close(model.seen_in_validation[0], expected)
    # ...and training resumes with the training weights.
    torch.testing.assert_close(model.linear.weight.detach(), recorder.history[-1])


def test_without_ema_for_eval_validation_sees_the_training_weights():
    recorder, ema = WeightRecorder(), EMACallback(decay=0.7, use_for_eval=False)
    model, _ = run(callbacks=[recorder, ema])
    torch.testing.assert_close(model.seen_in_validation[0], recorder.history[-1])


def test_checkpoint_holds_training_weights_and_the_ema(tmp_path):
    recorder, ema = WeightRecorder(), EMACallback(decay=0.7)
    model, trainer = run(callbacks=[recorder, ema])
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    torch.testing.assert_close(checkpoint["state_dict"]["linear.weight"], recorder.history[-1])
    torch.testing.assert_close(checkpoint["ema_state_dict"]["linear.weight"], ema.shadow["linear.weight"])
    assert set(checkpoint["ema_state_dict"]) == set(checkpoint["state_dict"])

    # Saving while the EMA weights are swapped in (mid-validation) still stores the training weights.
    ema.swap_in(model)
    trainer.save_checkpoint(tmp_path / "mid_val.ckpt")
    ema.swap_out(model)
    mid = torch.load(tmp_path / "mid_val.ckpt", weights_only=True)
    torch.testing.assert_close(mid["state_dict"]["linear.weight"], recorder.history[-1])

    # Resuming restores the average from the callback state.
    restored = EMACallback(decay=0.7)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("EMACallback"))
    restored.load_state_dict(state)
    restored.on_fit_start(trainer, model)
    torch.testing.assert_close(restored.shadow["linear.weight"], ema.shadow["linear.weight"])


def test_bad_decay_names_the_range():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMACallback(decay=1.0)
