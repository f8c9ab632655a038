"""How much an ODE likelihood moves, and what it saves, when its solver tolerance is loosened.

    python experiments/benchmarks/likelihood_tolerance.py \
        outputs/benchmark/runs/digits__diffusion__seed0/checkpoints/last.ckpt [more checkpoints] \
        [--tolerances 1e-5 1e-4 1e-3] [--split test] [--max-examples 500]

For each checkpoint (read by the allow-listed loader, EMA weights where the run kept them) and each tolerance,
sets ``rtol = atol`` of the model's ``likelihood_solver`` (flow matching, diffusion's probability-flow ODE) and
scores the split with the evaluator's own likelihood (:func:`lightning_flows.evaluation.likelihood.split_likelihood`:
same batches, same per-batch seeds, so Hutchinson's probes are identical across tolerances). Prints the NLL of
every kind (bits/dim on discrete data), its change against the first (tightest) tolerance, the ODE field
evaluations and the seconds. The tolerances in experiments/digits/{diffusion,flow_matching}.yaml and
experiments/toy2d/diffusion.yaml were chosen from this table on the quick benchmark's checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import torch  # noqa: E402

from lightning_flows.checkpoints import load_model_and_data  # noqa: E402
from lightning_flows.evaluation.likelihood import split_likelihood  # noqa: E402
from lightning_flows.ode.solve import observe_field_evaluations  # noqa: E402


def tolerance_rows(model, datamodule, tolerances: list[float], split: str = "test", max_examples: int | None = None,
                   batch_size: int = 500, seed: int = 0) -> list[dict]:
    """One row per tolerance: ``{"tolerance", "nfe", "seconds", "<kind>": value, "<kind>_change": value}``, the
    value in bits/dim for discrete data, else nats; changes are against ``tolerances[0]``."""
    if not hasattr(model, "likelihood_solver"):
        raise ValueError(f"{type(model).__name__} has no ODE likelihood_solver to loosen; this script is for flow "
                         f"matching and diffusion checkpoints.")
    datamodule.setup()
    data = datamodule.split(split)[:max_examples] if max_examples else datamodule.split(split)
    model.eval()
    original, rows = model.likelihood_solver, []
    try:
        for tolerance in tolerances:
            model.likelihood_solver = dataclasses.replace(original, rtol=tolerance, atol=tolerance)
            calls: list[None] = []
            start = time.perf_counter()
            with observe_field_evaluations(lambda log=calls: log.append(None)):
                outcome = split_likelihood(model, data, batch_size, seed, rank=0, world=1, extras=False)
            row = {"tolerance": tolerance, "nfe": len(calls), "seconds": time.perf_counter() - start}
            for kind, nll in outcome.nll.items():
                row[kind] = float(datamodule.bits_per_dim(nll)) if datamodule.is_discrete else nll
                row[f"{kind}_change"] = row[kind] - rows[0][kind] if rows else 0.0
            rows.append(row)
    finally:
        model.likelihood_solver = original
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of flow matching or diffusion runs")
    parser.add_argument("--tolerances", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3],
                        help="rtol = atol values, tightest first (the reference)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="first examples of the split only (the quick suite scores all 180 test digits and "
                             "2,000 of the 8 Gaussians test points)")
    parser.add_argument("--batch-size", type=int, default=500, help="the quick suite's likelihood_batch_size")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    for path in opts.checkpoints:
        model, datamodule = load_model_and_data(path)
        unit = "bits/dim" if datamodule.is_discrete else "nats"
        print(f"\n{path} ({type(model).__name__} on {datamodule.dataset}, {unit})")
        for row in tolerance_rows(model, datamodule, opts.tolerances, opts.split, opts.max_examples, opts.batch_size):
            values = ", ".join(f"{kind} {row[kind]:.5f} ({row[kind + '_change']:+.5f})" for kind in row
                               if kind not in ("tolerance", "nfe", "seconds") and not kind.endswith("_change"))
            print(f"  tol {row['tolerance']:.0e}: NFE {row['nfe']:5d}, {row['seconds']:6.1f} s, {values}", flush=True)


if __name__ == "__main__":
    main()
