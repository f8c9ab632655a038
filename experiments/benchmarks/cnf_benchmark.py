"""CNF machinery, measured: adjoint vs direct memory, torch.func trace speed.

    python experiments/benchmarks/cnf_benchmark.py
    python experiments/benchmarks/cnf_benchmark.py --tiny   # seconds: every stage at toy sizes (numbers meaningless)

(The toy2d NLL gaps of every likelihood family are measured through the shared evaluator by
``experiments/benchmarks/toy_nll.py``.)

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
Everything runs with one intra-op thread (two threads thrash on this shared 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import torch  # noqa: E402

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


def memory_table(step_counts=MEMORY_STEPS, fresh_processes: bool = True) -> list[tuple[int, float, float]]:
    """``(steps, direct MiB, adjoint MiB)`` rows; ``fresh_processes=False`` (``--tiny``) probes in this process,
    which only checks the wiring: peaks of earlier probes mask later ones."""
    rows = []
    for steps in step_counts:
        peaks = []
        for adjoint in (False, True):
            if not fresh_processes:
                peaks.append(memory_probe(steps, adjoint))
                continue
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-probe", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true",
                        help="2 and 4 steps probed in this process, one small trace case: checks every stage")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    if opts.memory_probe:
        print(memory_probe(opts.memory_probe[0], bool(opts.memory_probe[1])))
        return
    total = time.perf_counter()

    rows = memory_table((2, 4), fresh_processes=False) if opts.tiny else memory_table()
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
    for hidden, batch in ((16, 4),) if opts.tiny else ((64, 16), (64, 128), (256, 128)):
        r = trace_speed(hidden, batch, repeats=1 if opts.tiny else 10)
        print(f"| {hidden} | {batch} | {r['func'] * 1e3:.1f} | {r['loop'] * 1e3:.1f} | "
              f"{r['loop'] / r['func']:.1f}x | {r['max_diff']:.1e} |")

    print(f"\ntotal wall time {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
