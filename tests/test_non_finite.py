"""NonFiniteGuard: a NaN/inf loss or gradient never reaches the weights, for automatic and manual
optimisation; too many bad steps in a row stop training with finite, last-good weights."""

from __future__ import annotations

import glob
import os
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from subprocess_runs import run as run_process
from lightning_flows.callbacks import NonFiniteGuard
from lightning_flows.callbacks.non_finite import non_finite_flag, skips_on_device
from lightning_flows.models import RealNVP


class TinyRegressor(L.LightningModule):
    """``loss = mean((W x)^2) + offset``; ``offset`` lets a test make the loss inf with finite grads;
    ``fused`` builds Adam's fused kernel (the guard then skips on the device, through ``found_inf``)."""

    def __init__(self, offset: float = 0.0, fused: bool = False):
        super().__init__()
        self.net = torch.nn.Linear(3, 3)
        self.offset, self.fused = offset, fused

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean() + self.offset

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1, weight_decay=0.1, fused=self.fused)


class WeightRecorder(L.Callback):
    """Snapshot the weights before and after every training batch."""

    def __init__(self):
        self.before, self.after = [], []

    def _snapshot(self, module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._snapshot(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._snapshot(pl_module))


def batches_with_nan_at(n_batches: int, bad: set[int], value=float("nan"), batch_size=4, dim=3):
    data = torch.randn(n_batches * batch_size, dim)
    for b in bad:
        data[b * batch_size] = value
    return DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=False)


def quiet_trainer(callbacks, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1)
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class OptimizerStateRecorder(L.Callback):
    """Adam's step counts and moments after every training batch."""

    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        self.after.append({(id(p), k): v.detach().clone() for p, s in state.items() for k, v in s.items()})


@pytest.mark.parametrize("fused", [False, True], ids=["host-skip", "device-skip"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_batch_leaves_weights_finite_and_unchanged(value, fused):
    torch.manual_seed(0)
    guard, recorder, moments = NonFiniteGuard(max_consecutive=5), WeightRecorder(), OptimizerStateRecorder()
    model = TinyRegressor(fused=fused)
    trainer = quiet_trainer([guard, recorder, moments])
    trainer.fit(model, batches_with_nan_at(3, bad={1}, value=value))
    assert skips_on_device(trainer.optimizers[0], trainer) == fused
    assert guard.skipped_steps == 1 and guard.stop_reason is None
    assert all(torch.equal(moments.after[0][k], moments.after[1][k]) for k in moments.after[0])  # no moment, no step
    assert not same(recorder.before[0], recorder.after[0])  # a good step moves the weights
    assert same(recorder.before[1], recorder.after[1])  # the bad one does not (nor Adam's decay)
    assert not same(recorder.before[2], recorder.after[2])  # training continues afterwards
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_the_guard_the_same_batch_poisons_the_weights():
    # The control: proves the batch above really would have reached the weights.
    torch.manual_seed(0)
    model = TinyRegressor()
    quiet_trainer([]).fit(model, batches_with_nan_at(3, bad={1}))
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True], ids=["host-skip", "device-skip"])
def test_infinite_loss_with_finite_gradients_is_skipped(fused):
    torch.manual_seed(0)
    guard, recorder = NonFiniteGuard(), WeightRecorder()
    model = TinyRegressor(offset=float("inf"), fused=fused)
    quiet_trainer([guard, recorder], max_steps=2).fit(model, batches_with_nan_at(2, set()))
    assert guard.skipped_steps == 2
    assert all(same(b, a) for b, a in zip(recorder.before, recorder.after))


def test_disabled_guard_lets_the_nan_through():
    torch.manual_seed(0)
    model = TinyRegressor()
    quiet_trainer([NonFiniteGuard(enabled=False)]).fit(model, batches_with_nan_at(3, bad={1}))
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_flag_is_one_device_tensor_for_nan_inf_and_overflowing_gradients():
    def params(*grads):
        out = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g
            out.append(p)
        return out

    finite = params(torch.randn(4, 3), torch.randn(3))
    assert non_finite_flag(finite).shape == () and not bool(non_finite_flag(finite))
    for bad in (float("nan"), float("inf"), -float("inf"), 1e20):  # 1e20**2 overflows Adam's second moment too
        grads = [torch.randn(4, 3), torch.randn(3)]
        grads[1][2] = bad
        assert bool(non_finite_flag(params(*grads))), bad
    assert bool(non_finite_flag(finite, losses=[torch.tensor(float("inf"))]))
    assert not bool(non_finite_flag(finite, losses=[torch.tensor(2.0)]))
    assert bool(non_finite_flag([], losses=[torch.tensor(float("nan"))]))
    assert non_finite_flag([torch.nn.Parameter(torch.zeros(2))]) is None  # no gradient: nothing to check


@pytest.mark.parametrize("fused", [False, True], ids=["host-skip", "device-skip"])
def test_consecutive_bad_steps_stop_training_and_checkpoint_holds_last_good_weights(tmp_path, fused):
    torch.manual_seed(0)
    # On the device the host reads the counters every check_every_n_steps steps: 1 stops at the same step.
    guard, recorder = NonFiniteGuard(max_consecutive=3, check_every_n_steps=1), WeightRecorder()
    model = TinyRegressor(fused=fused)
    loader = batches_with_nan_at(10, bad=set(range(2, 10)))
    trainer = quiet_trainer([guard, recorder], enable_checkpointing=True, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="3 consecutive optimizer steps"):
        trainer.fit(model, loader)
    assert trainer.global_step == 5 and guard.skipped_steps == 3  # 2 good steps, then 3 bad: stop
    assert "Lower the learning rate" in guard.stop_reason
    last_good = recorder.after[1]
    assert same(last_good, {k: v.detach() for k, v in model.state_dict().items()})
    checkpoint = glob.glob(f"{tmp_path}/**/*.ckpt", recursive=True)
    assert checkpoint
    saved = torch.load(checkpoint[0], weights_only=True)["state_dict"]
    assert same(last_good, saved)


def test_actnorm_does_not_initialise_from_a_nan_batch():
    torch.manual_seed(0)
    guard = NonFiniteGuard()
    model = RealNVP(data_shape=(3,), steps=2, hidden=8)
    batches = [torch.full((8, 3), float("nan")), *torch.randn(2, 8, 3)]
    quiet_trainer([guard], max_steps=3, limit_val_batches=0).fit(model, DataLoader(batches, batch_size=None))
    assert guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    actnorm = model.flow.bijection.layers[0]
    assert bool(actnorm.initialized) and actnorm.log_scale.abs().sum() > 0  # initialised from a finite batch


class TwoOptimizerManual(L.LightningModule):
    """Manual optimisation with two optimizers, as GAN families do."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        for net, opt in ((self.a, opt_a), (self.b, opt_b)):
            opt.zero_grad()
            self.manual_backward(net(batch[0]).pow(2).mean())
            opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.a.parameters(), lr=0.1), torch.optim.Adam(self.b.parameters(), lr=0.1)


def test_manual_optimisation_is_guarded_per_optimizer():
    torch.manual_seed(0)
    guard, recorder = NonFiniteGuard(), WeightRecorder()
    quiet_trainer([guard, recorder]).fit(TwoOptimizerManual(), batches_with_nan_at(2, bad={1}))
    assert guard.skipped_steps == 2  # both optimizers' steps of the bad batch
    assert not same(recorder.before[0], recorder.after[0])
    assert same(recorder.before[1], recorder.after[1])


DDP_SCRIPT = textwrap.dedent('''
    import sys
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from lightning_flows.callbacks import NonFiniteGuard

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 3)
        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.1, fused=self.fused)

    class OnlyRankOneGetsNaN(torch.utils.data.IterableDataset):
        def __iter__(self):
            rank = torch.distributed.get_rank()
            for step in range(3):
                x = torch.randn(4, 3)
                if rank == 1 and step == 1:
                    x[0, 0] = float("nan")
                yield x,

    L.seed_everything(0)
    guard, model = NonFiniteGuard(), Tiny()
    model.fused = sys.argv[2] == "fused"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[guard])
    trainer.fit(model, DataLoader(OnlyRankOneGetsNaN(), batch_size=None))
    torch.save({"skipped": guard.skipped_steps, "state": model.state_dict()},
               f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
    from lightning_flows.cli import end_distributed
    end_distributed()
''')


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("optimizer", ["unfused", "fused"], ids=["host-skip", "device-skip"])
def test_ddp_ranks_agree_to_skip_when_only_one_sees_nan(tmp_path, optimizer):
    script = tmp_path / "guard_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, str(script), str(tmp_path), optimizer], timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1
    assert same(r0["state"], r1["state"]) and all(torch.isfinite(v).all() for v in r0["state"].values())


def test_device_skip_stops_at_the_next_check_after_too_many_bad_steps():
    torch.manual_seed(0)
    guard = NonFiniteGuard(max_consecutive=3, check_every_n_steps=4)
    trainer = quiet_trainer([guard])
    with pytest.warns(UserWarning, match="consecutive optimizer steps"):
        trainer.fit(TinyRegressor(fused=True), batches_with_nan_at(12, bad=set(range(2, 12))))
    # 2 good steps, then bad ones: the run of 3 is complete at step 5, read at the check after step 8.
    assert trainer.global_step == 8 and guard.skipped_steps == 6 and guard.consecutive == 6
    assert guard.state_dict() == {"skipped_steps": 6, "consecutive": 6}
