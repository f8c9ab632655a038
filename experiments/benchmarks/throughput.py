"""Training throughput of one ``lightning-flows fit`` configuration: images/s and peak memory, one line.

    python experiments/benchmarks/throughput.py --label bf16 --config experiments/mnist5k/glow.yaml \
        --steps 150 --warmup 20 -- --trainer.precision bf16-mixed --performance.channels_last true

Everything after ``--`` is passed to the CLI. The run is the committed config with ``max_steps = warmup + steps``,
no validation, no checkpoints and no logger; the clock starts after ``warmup`` steps (compilation, cuDNN
autotuning and allocator growth happen there) and stops at the end of training, with one device
synchronisation at each end. Under DDP (``--trainer.devices 2``) every rank counts its own images and rank 0
prints the sum over ranks divided by the slowest rank's time. Printed by rank 0::

    RESULT <label> images/s=<x> peak_mem_MiB=<y> steps=<n> devices=<d> device=<name>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import lightning as L  # noqa: E402
import torch  # noqa: E402


class WindowClock(L.Callback):
    """Images and seconds of the training steps after the first ``warmup`` ones."""

    def __init__(self, warmup: int):
        self.warmup, self.images, self.start, self.seconds = warmup, 0, None, None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.warmup and self.start is None:
            self._sync(pl_module)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start = time.perf_counter()
        elif self.start is not None:
            first = batch[0] if isinstance(batch, (tuple, list)) else getattr(batch, "x1", batch)
            self.images += int(first.shape[0])

    def on_train_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS on the CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then extra lightning-flows fit arguments")
    opts = parser.parse_args()
    extra = opts.cli[1:] if opts.cli[:1] == ["--"] else opts.cli

    from lightning_flows.training import build_cli

    clock = WindowClock(opts.warmup)
    args = ["--config", opts.config, "--trainer.max_steps", str(opts.warmup + opts.steps), "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]
    cli = build_cli(args, run=False)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    trainer, device = cli.trainer, cli.model.device
    if clock.seconds is None:
        raise SystemExit(f"{opts.label}: fewer than {opts.warmup} steps ran; nothing was timed")
    totals = torch.tensor([clock.images, clock.seconds, peak_memory_mib(device)], dtype=torch.float64,
                          device=device)
    if trainer.world_size > 1:
        gathered = trainer.strategy.all_gather(totals)  # (world, 3)
        images, seconds, memory = float(gathered[:, 0].sum()), float(gathered[:, 1].max()), float(gathered[:, 2].max())
    else:
        images, seconds, memory = (float(v) for v in totals)
    if trainer.is_global_zero:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"RESULT {opts.label} images/s={images / seconds:.1f} peak_mem_MiB={memory:.0f} "
              f"steps={opts.steps} devices={trainer.world_size} device={name.replace(' ', '_')}", flush=True)


if __name__ == "__main__":
    main()
