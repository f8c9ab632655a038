"""EMA callback: closed-form averages (with and without the decay warm-up), EMA weights at evaluation and
after fit, training weights restored for training, one update per optimizer step, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from lightning_flows.callbacks import EMACallback
from lightning_flows.callbacks.ema import warmed_up_decay
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
    """The weights after every optimiser step (plus the initial ones), and those each batch starts from."""

    def __init__(self):
        self.history: list[torch.Tensor] = []
        self.at_batch_start: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.history.append(pl_module.linear.weight.detach().clone())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_batch_start.append(pl_module.linear.weight.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append(pl_module.linear.weight.detach().clone())


def run(steps=5, epochs=1, **kwargs):
    torch.manual_seed(0)
    model = TinyModel()
    trainer = L.Trainer(max_steps=steps * epochs, max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, GenerativeDataModule("8gaussians", batch_size=32))
    return model, trainer


def closed_form_ema(history: list[torch.Tensor], decays: list[float]) -> torch.Tensor:
    """``prod_k d_k theta_0 + sum_k (1 - d_k) prod_{j > k} d_j theta_k``: updates ``k = 1..n``, decays ``d_k``."""
    total = history[0]
    for theta, d in zip(history[1:], decays):
        total = d * total + (1 - d) * theta
    return total


def test_ema_equals_the_closed_form_and_is_used_for_validation_and_after_fit():
    decay = 0.7
    recorder, ema = WeightRecorder(), EMACallback(decay=decay, warmup=False)
    model, trainer = run(epochs=2, callbacks=[recorder, ema])
    assert len(recorder.history) == 11
    for n_steps, seen in zip((5, 10), model.seen_in_validation):
        # Validation (end of each epoch) saw the closed-form average of the weights so far...
        torch.testing.assert_close(seen, closed_form_ema(recorder.history[:n_steps + 1], [decay] * n_steps))
    expected = closed_form_ema(recorder.history, [decay] * 10)
    torch.testing.assert_close(ema.shadow["linear.weight"], expected)
    assert not torch.allclose(expected, recorder.history[-1], atol=1e-4)  # the average really lags
    # ...training resumed after the first validation from the training weights...
    torch.testing.assert_close(recorder.at_batch_start[5], recorder.history[5])
    # ...and once fit is over the model holds the EMA weights (what evaluation and sampling use).
    torch.testing.assert_close(model.linear.weight.detach(), expected)


def test_decay_warm_up_forgets_the_initial_weights():
    decay = 0.999
    assert [warmed_up_decay(decay, n) for n in (0, 1, 10)] == [0.1, 2 / 11, 11 / 20]
    assert warmed_up_decay(decay, 100_000) == decay
    recorder, ema = WeightRecorder(), EMACallback(decay=decay)
    run(callbacks=[recorder, ema])
    decays = [warmed_up_decay(decay, n) for n in range(5)]
    expected = closed_form_ema(recorder.history, decays)
    torch.testing.assert_close(ema.shadow["linear.weight"], expected)
    # The initial weights keep a weight of prod d_k = 0.1 * 0.18 * 0.25 * ... (about 0.1%), not 0.999^5.
    initial_weight = torch.tensor(decays).prod().item()
    assert initial_weight < 2e-3
    without = closed_form_ema(recorder.history, [decay] * 5)
    assert (ema.shadow["linear.weight"] - recorder.history[-1]).norm() < 0.5 * (without - recorder.history[-1]).norm()


def test_one_update_per_optimizer_step_under_gradient_accumulation():
    ema = EMACallback(decay=0.9)
    run(steps=6, callbacks=[ema], accumulate_grad_batches=2)
    assert ema.num_updates == 3


def test_a_second_fit_trains_from_the_training_weights():
    recorder, ema = WeightRecorder(), EMACallback(decay=0.7)
    model, _ = run(callbacks=[recorder, ema])
    trained = recorder.history[-1]
    assert not torch.allclose(model.linear.weight, trained)  # the EMA weights are in after fit
    again = L.Trainer(max_steps=2, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[recorder, ema])
    again.fit(model, GenerativeDataModule("8gaussians", batch_size=32))
    torch.testing.assert_close(recorder.at_batch_start[5], trained)


def test_without_ema_for_eval_validation_sees_the_training_weights():
    recorder, ema = WeightRecorder(), EMACallback(decay=0.7, use_for_eval=False)
    model, _ = run(callbacks=[recorder, ema])
    torch.testing.assert_close(model.seen_in_validation[0], recorder.history[-1])
    torch.testing.assert_close(model.linear.weight.detach(), recorder.history[-1])


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
