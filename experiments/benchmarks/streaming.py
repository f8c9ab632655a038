"""Streaming vs in-memory training data: peak resident memory as the dataset grows, and training steps/s.

    python experiments/benchmarks/streaming.py                      # 20,000 and 200,000 32x32 RGB images
    python experiments/benchmarks/streaming.py --tiny               # a seconds-long check of the script itself

For each dataset size the script writes an ``.npz`` of procedural 32x32 RGB images (smooth random gradients plus
noise, seeded: the numbers are about the data pipeline, not a model), builds its index and litdata shards once
(in a process of their own), then trains the same small model (flow matching with an MLP field, so the step is
short and the loader's cost shows) as a separate ``lightning-flows fit`` process per mode:

* ``memory``: the whole training split in memory (the default loader);
* ``streaming, w workers``: ``--data.streaming true --data.num_workers w``.

Each process reports, over the steps after ``--warmup``, its steps/s on the wall clock and on its own CPU clock
(which the other jobs of a shared machine cannot slow down; the loader workers' CPU is reported beside it), and
its memory: the training process's own peak RSS (``VmHWM`` from ``/proc``, so Linux only: ``getrusage``'s
``ru_maxrss`` is carried across ``exec`` from the forked parent, here the script holding the images it wrote) and
the peak of its loader workers' summed private memory (USS: the pages a forked worker does not share with the
training process, i.e. what the workers add), sampled every 0.1 s. Modes run back to back for
``--rounds`` rounds, alternating their order; the table gives the medians and the ratios to ``memory`` in the
same round. The val split is empty and the test split 1% (what the evaluation keeps in memory in either mode);
validation is off, so neither mode holds evaluation noise. Writes ``<out>/streaming.json`` and prints a Markdown
table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import numpy as np  # noqa: E402

SIZE = 32
DATA_ARGS = ["--data.val_fraction", "0.0", "--data.test_fraction", "0.01"]
MODEL_ARGS = ["--model.init_args.backbone", "mlp", "--model.init_args.hidden", "256", "--model.init_args.depth", "2"]


def write_images(path: Path, n: int, size: int = SIZE, seed: int = 0, block: int = 10_000) -> Path:
    """``n`` procedural ``size x size`` RGB images into an uncompressed ``.npz`` (``images``, ``labels``)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    grid = np.linspace(0, 1, size, dtype=np.float32)
    for start in range(0, n, block):
        m = min(block, n - start)
        slope = rng.uniform(-1, 1, (m, 1, 1, 2, 3)).astype(np.float32)
        ramp = grid[None, :, None, None] * slope[..., 0, :] + grid[None, None, :, None] * slope[..., 1, :]
        noise = rng.normal(0, 12, (m, size, size, 3)).astype(np.float32)
        images[start:start + m] = np.clip(128 + 100 * ramp + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=rng.integers(0, 10, n))
    return path


def prepare(npz: Path, cache: Path) -> float:
    """Index and shards of ``npz``, built once before anything is measured; returns the seconds it took."""
    started = time.perf_counter()
    from lightning_flows.data import GenerativeDataModule

    dm = GenerativeDataModule(str(npz), cache_dir=str(cache), streaming=True, val_fraction=0.0, test_fraction=0.01)
    dm.prepare_data()
    return time.perf_counter() - started


def _proc_fields(pid: int | str, name: str) -> dict[str, int]:
    """``/proc/<pid>/<name>`` (``status`` or ``smaps_rollup``) as ``{field: kB}``."""
    fields = {}
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0])
    return fields


class WorkerSampler(threading.Thread):
    """Every ``interval`` seconds: the summed private memory (MiB) and CPU seconds of this process's children (the
    loader workers), keeping the peak memory and each worker's last CPU time (so a worker that exits still counts)."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.peak_private_mib, self.cpu = interval, 0.0, {}
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.stopped = threading.Event()

    def children(self) -> list[str]:
        pid = os.getpid()
        found = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                found += open(f"/proc/{pid}/task/{task}/children").read().split()
            except OSError:
                pass
        return found

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            total = 0
            for child in self.children():
                try:
                    rollup = _proc_fields(child, "smaps_rollup")
                    total += rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
                    stat = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()
                    self.cpu[child] = (int(stat[11]) + int(stat[12])) / self.ticks  # utime + stime
                except (OSError, IndexError, ValueError):  # exited between listing and reading
                    pass
            self.peak_private_mib = max(self.peak_private_mib, total / 1024)

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())


def measure(npz: str, cache: str, streaming: bool, workers: int, steps: int, warmup: int, batch: int) -> dict:
    """One training process (this one): steps/s after ``warmup`` steps, on the wall and CPU clocks, and memory."""
    import lightning as L
    import torch
    from throughput import WindowClock

    from lightning_flows.training import build_cli

    class CPUClock(L.Callback):
        """The CPU seconds of this process and of its workers over the steps WindowClock times."""

        def __init__(self, window: WindowClock, sampler: WorkerSampler):
            self.window, self.sampler, self.start = window, sampler, None

        def on_train_batch_end(self, trainer, *args) -> None:
            if self.start is None and self.window.start is not None:
                self.start = (time.process_time(), self.sampler.cpu_seconds())

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds = time.process_time() - self.start[0]
            self.worker_seconds = self.sampler.cpu_seconds() - self.start[1]

    torch.set_num_threads(1)
    sampler = WorkerSampler()
    sampler.start()
    clock = WindowClock(warmup)
    cpu = CPUClock(clock, sampler)
    args = ["--config", str(ROOT / "experiments/cifar10/flow_matching.yaml"), *MODEL_ARGS,
            "--data.dataset", npz, "--data.cache_dir", cache, "--data.batch_size", str(batch), *DATA_ARGS,
            "--data.streaming", str(streaming).lower(), "--data.num_workers", str(workers),
            "--trainer.max_steps", str(warmup + steps), "--trainer.max_epochs", "-1", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(Path(cache).parent / "runs"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = build_cli(args, run=False)
    cli.trainer.callbacks += [clock, cpu]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    sampler.stopped.set()
    sampler.join()
    done = clock.images / batch
    return {"steps_per_s": done / clock.seconds, "steps_per_cpu_s": done / cpu.seconds,
            "worker_cpu_ms_per_step": 1000 * cpu.worker_seconds / done,
            "peak_rss_mib": _proc_fields("self", "status")["VmHWM"] / 1024,
            "workers_peak_private_mib": sampler.peak_private_mib}


def run_measure(npz: Path, cache: Path, mode: tuple[bool, int], opts) -> dict:
    streaming, workers = mode
    command = [sys.executable, __file__, "--measure", str(npz), "--cache", str(cache), "--streaming",
               str(int(streaming)), "--workers", str(workers), "--steps", str(opts.steps), "--warmup",
               str(opts.warmup), "--batch", str(opts.batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{Path(__file__).parent}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{command} failed:\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))


def mode_name(mode: tuple[bool, int]) -> str:
    return f"streaming, {mode[1]} worker{'s' if mode[1] != 1 else ''}" if mode[0] else "memory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="streaming loader workers to try")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="outputs/streaming")
    parser.add_argument("--tiny", action="store_true", help="two small datasets, a few steps: checks the script")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one training process on this npz
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--streaming", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.measure:
        print(json.dumps(measure(opts.measure, opts.cache, bool(opts.streaming), opts.workers[0], opts.steps,
                                 opts.warmup, opts.batch)), flush=True)
        return
    if opts.tiny:
        opts.sizes, opts.steps, opts.warmup, opts.batch, opts.rounds = [1_000, 3_000], 4, 2, 16, 1
    out = Path(opts.out)
    from lightning_flows.benchmark.environment import script_environment

    modes = [(False, 0)] + [(True, w) for w in opts.workers]
    rows = []
    for n in opts.sizes:
        npz = write_images(out / f"images_{n}.npz", n)
        cache = out / f"cache_{n}"
        seconds = prepare(npz, cache)
        runs: dict[str, list[dict]] = {mode_name(m): [] for m in modes}
        for r in range(opts.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):  # alternate which mode goes first
                runs[mode_name(mode)].append(run_measure(npz, cache, mode, opts))
        for name, measured in runs.items():
            ratios = [m["steps_per_s"] / base["steps_per_s"] for m, base in zip(measured, runs["memory"])]
            cpu_ratios = [m["steps_per_cpu_s"] / base["steps_per_cpu_s"] for m, base in zip(measured, runs["memory"])]
            rows.append({"images": n, "dataset_mib": n * 3 * SIZE * SIZE / 2**20, "mode": name,
                         "prepare_s": seconds, "steps_per_s": statistics.median(m["steps_per_s"] for m in measured),
                         "ratio_to_memory": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios),
                         "steps_per_cpu_s": statistics.median(m["steps_per_cpu_s"] for m in measured),
                         "cpu_ratio_to_memory": statistics.median(cpu_ratios),
                         "worker_cpu_ms_per_step": statistics.median(m["worker_cpu_ms_per_step"] for m in measured),
                         "peak_rss_mib": max(m["peak_rss_mib"] for m in measured),
                         "workers_peak_private_mib": max(m["workers_peak_private_mib"] for m in measured)})
        npz.unlink()  # the shards stay in the cache; the array file is no longer needed
    (out / "streaming.json").write_text(json.dumps({
        "environment": script_environment(ROOT, "cpu", 1, "one intra-op thread per training process"),
        "settings": {k: getattr(opts, k) for k in ("sizes", "workers", "steps", "warmup", "batch", "rounds")},
        "rows": rows}, indent=1))
    print("| images (MiB of pixels) | mode | steps/s (wall) | vs memory (min-max) | steps per CPU s, training "
          "process | vs memory | workers' CPU per step | peak RSS, training process | peak private memory, workers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        workers = row["mode"].startswith("streaming") and not row["mode"].startswith("streaming, 0")
        private = f"{row['workers_peak_private_mib']:.0f} MiB" if workers else "-"
        worker_cpu = f"{row['worker_cpu_ms_per_step']:.1f} ms" if workers else "-"
        print(f"| {row['images']:,} ({row['dataset_mib']:.0f}) | {row['mode']} | {row['steps_per_s']:.1f} | "
              f"{row['ratio_to_memory']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | "
              f"{row['steps_per_cpu_s']:.1f} | {row['cpu_ratio_to_memory']:.2f} | {worker_cpu} | "
              f"{row['peak_rss_mib']:.0f} MiB | {private} |")

if __name__ == "__main__":
    main()
