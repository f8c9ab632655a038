"""CNF machinery, measured: adjoint vs direct memory, torch.func trace speed, exact NLL gaps on toy2d.

    python experiments/benchmarks/cnf_benchmark.py [--seconds 80] [--skip-nll]

1. Peak memory of one CNF training step (forward + backward of the exact-trace likelihood) as the
   number of fixed Euler steps goes 10 -> 100, backprop through the solver vs the adjoint method.
   Measured as the process's peak resident set size (``resource.getrusage(...).ru_maxrss``, which the
   kernel tracks for all allocations, torch's C++ ones included; tracemalloc would miss them) minus
   the RSS just before the step, each configuration in a fresh subprocess so that peaks do not mix,
   with glibc told to return freed blocks >= 64 KiB to the kernel (so the RSS before the step is
   live memory, not a warm-up's cached pool).
2. Exact divergence at D = 64: torch.func (vectorised vector-Jacobian products) vs a Python loop
   of D autograd calls (FFJORD's brute force), with the graph kept and backpropagated (training),
   for a small and a large field: vectorising removes per-call overhead, not FLOPs, so the gain
   shrinks once each call is compute-bound.
3. On toy2d 8gaussians and checkerboard: exact test NLL (dopri5 1e-5, exact trace) of the CNF and of
   flow matching, each trained for ``--seconds`` from its committed config, beside the true entropy
   H = -mean log p_data(test) from the dataset's analytic density; the gap NLL - H in nats (the
   peers' column in ANCHORS.md, which used 90 s each on the same machine).
Everything runs with one intra-op thread (two threads thrash on this shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from lightning_flows.data import GenerativeDataModule  # noqa: E402
from lightning_flows.models import CNF, FlowMatching  # noqa: E402
from lightning_flows.nn.ode_functions import ConcatSquashMLP  # noqa: E402
from lightning_flows.ode import (  # noqa: E402
    SolverConfig, brute_force_divergence, exact_divergence, ode_log_likelihood,
)

CONFIGS = Path(__file__).resolve().parents[1] / "toy2d"
MEMORY_STEPS = (10, 25, 50, 100)


# ---- 1. memory ----
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(steps: int, adjoint: bool) -> float:
    """Peak extra MiB of one training step (run inside a fresh process)."""
    torch.manual_seed(0)
    field = ConcatSquashMLP((2,), hidden=256, depth=3)
    x = torch.randn(256, 2)

    def step(n_steps: int) -> None:
        field.zero_grad()
        result = ode_log_likelihood(field, x, SolverConfig("euler", steps=n_steps, max_nfe=10_000,
                                                           adjoint=adjoint))
        (-result.log_prob.mean()).backward()

    step(1)  # warm-up: lazy initialisation and allocator pools, not part of the measurement
    before = _rss_mib()
    step(steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return peak - before


def memory_table() -> list[tuple[int, float, float]]:
    rows = []
    for steps in MEMORY_STEPS:
        peaks = []
        for adjoint in (False, True):
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run([sys.executable, __file__, "--memory-probe", str(steps), str(int(adjoint))],
                                 capture_output=True, text=True, check=True, env=env)
            peaks.append(float(out.stdout.strip().splitlines()[-1]))
        rows.append((steps, *peaks))
    return rows


# ---- 2. trace speed ----
def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def trace_speed(hidden: int, batch: int, dim: int = 64, repeats: int = 10) -> dict:
    torch.manual_seed(0)
    field = ConcatSquashMLP((dim,), hidden=hidden, depth=3)
    z = torch.randn(batch, dim)
    t = torch.tensor(0.5)

    def f(z_):
        return field(z_, t)

    def vectorised():
        field.zero_grad()
        exact_divergence(f, z)[1].sum().backward()

    def loop():
        field.zero_grad()
        brute_force_divergence(f, z)[1].sum().backward()

    _, a, _ = exact_divergence(f, z)
    _, b = brute_force_divergence(f, z)
    max_diff = (a - b).abs().max().item()
    return {"func": _time(vectorised, repeats), "loop": _time(loop, repeats), "max_diff": max_diff,
            "hidden": hidden, "batch": batch}


# ---- 3. NLL gaps ----
def train_and_score(family: str, dataset: str, seconds: float, seed: int) -> dict:
    config = yaml.safe_load((CONFIGS / f"{family}.yaml").read_text())
    L.seed_everything(seed)
    datamodule = GenerativeDataModule(**{**config["data"], "dataset": dataset, "seed": seed})
    model_class = {"cnf": CNF, "flow_matching": FlowMatching}[family]
    model = model_class(data_shape=datamodule.data_shape, **config["model"]["init_args"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_time={"seconds": seconds}, max_epochs=100_000,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    train_seconds = time.perf_counter() - start
    test = datamodule.split("test")
    model.eval()
    start = time.perf_counter()
    solver = SolverConfig("dopri5", rtol=1e-5, atol=1e-5, max_nfe=20_000)
    with torch.no_grad():
        log_q = model.log_prob(test, solver=solver).double()  # each family's exact log_prob
    eval_seconds = time.perf_counter() - start
    log_p = datamodule.true_log_density(test).double()
    gap = log_p - log_q  # per-point log p / q: its mean is the gap, paired so its error is small
    return {"family": family, "dataset": dataset, "steps": trainer.global_step, "train_s": train_seconds,
            "nll": -log_q.mean().item(), "entropy": -log_p.mean().item(), "gap": gap.mean().item(),
            "gap_se": gap.std().item() / math.sqrt(len(gap)), "eval_s": eval_seconds, "n_test": len(test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=80.0, help="training seconds per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-nll", action="store_true", help="only the memory and trace-speed parts")
    parser.add_argument("--memory-probe", nargs=2, type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    if opts.memory_probe:
        print(memory_probe(opts.memory_probe[0], bool(opts.memory_probe[1])))
        return
    total = time.perf_counter()

    rows = memory_table()
    print("\n## 1. Peak memory of one CNF training step (MiB above the pre-step RSS; D=2, batch 256, "
          "exact trace, ConcatSquashMLP 256x3, Euler)")
    print("| fixed steps | direct backprop | adjoint |")
    print("|---|---|---|")
    for steps, direct, adjoint in rows:
        print(f"| {steps} | {direct:.1f} | {adjoint:.1f} |")
    (s0, d0, a0), (s1, d1, a1) = rows[0], rows[-1]
    print(f"growth {s0} -> {s1} steps ({s1 / s0:.0f}x): direct {d1 / d0:.2f}x, adjoint {a1 / a0:.2f}x; "
          f"at {s1} steps direct / adjoint = {d1 / a1:.1f}x")

    print("\n## 2. Exact divergence at D=64, forward + backward to the parameters (as in training), "
          "ConcatSquashMLP depth 3")
    print("| hidden | batch | torch.func (ms) | Python loop over D (ms) | speed-up | max abs difference |")
    print("|---|---|---|---|---|---|")
    for hidden, batch in ((64, 16), (64, 128), (256, 128)):
        r = trace_speed(hidden, batch)
        print(f"| {hidden} | {batch} | {r['func'] * 1e3:.1f} | {r['loop'] * 1e3:.1f} | "
              f"{r['loop'] / r['func']:.1f}x | {r['max_diff']:.1e} |")

    if not opts.skip_nll:
        results = [train_and_score(family, dataset, opts.seconds, opts.seed)
                   for dataset in ("8gaussians", "checkerboard") for family in ("cnf", "flow_matching")]
        print(f"\n## 3. Exact test NLL on toy2d ({opts.seconds:.0f} s training per model from "
              f"experiments/toy2d/<family>.yaml, seed {opts.seed}; eval dopri5 1e-5, exact trace)")
        print("| dataset | model | steps | test NLL | true H | gap (nats) | eval s |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['dataset']} | {r['family']} | {r['steps']} | {r['nll']:.3f} | {r['entropy']:.3f} | "
                  f"{r['gap']:+.3f} +- {r['gap_se']:.3f} | {r['eval_s']:.0f} |")
        print(json.dumps(results))
    print(f"\ntotal wall time {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
