"""What the coloured exact trace saves on the digits CNF's conv field, measured in one run.

    python experiments/benchmarks/trace_colouring.py                 # the committed field, batch 500 (the suites')
    python experiments/benchmarks/trace_colouring.py --batch 8 --repeats 1

Builds the field of ``experiments/digits/cnf.yaml`` (random weights: the cost does not depend on them) and times
one exact trace ``Tr(df/dz)`` at the likelihood batch the suites use, under ``torch.no_grad`` on one intra-op thread,
as the evaluation computes it: one vector-Jacobian product per coordinate (64 on 8x8 digits), against one per
colour of the conv field's :meth:`divergence_colouring` (coordinates that never interact share a product); for the
conv + MLP field (``field: conv_mlp``, the committed one since 2026-12-07) its own exact trace, the conv part's
coloured products plus the MLP part's closed form. Both at the
config's ``trace_chunk_size``. Prints the median seconds of ``--repeats`` calls after a warm-up, their ratio, and
the largest difference between the two traces (they are the same sum, so it is float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import torch  # noqa: E402
import yaml  # noqa: E402

from lightning_flows.models.cnf import make_ode_field  # noqa: E402
from lightning_flows.ode import exact_divergence  # noqa: E402

CONFIG = ROOT / "experiments" / "digits" / "cnf.yaml"


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(batch: int, repeats: int, config: Path = CONFIG) -> dict:
    args = yaml.safe_load(config.read_text())["model"]["init_args"]
    shape = (1, 8, 8)
    torch.manual_seed(0)
    field = make_ode_field(shape, args["field"], args.get("hidden", 64), args["depth"], args["channels"],
                           args["activation"])
    conv = getattr(field, "conv", field)  # the conv + MLP field's conv part carries the colouring
    colouring = conv.divergence_colouring(shape)
    z = torch.randn(batch, *shape)
    t = torch.tensor(0.5)
    chunk = args.get("trace_chunk_size")

    def velocity(x):
        return field(x, t)

    with torch.no_grad():
        plain_s, (_, plain, _) = median_seconds(lambda: exact_divergence(velocity, z, chunk_size=chunk), repeats)
        if hasattr(field, "velocity_and_divergence"):  # conv + MLP: coloured conv part, closed-form MLP part
            def fast():
                return field.velocity_and_divergence(z, t, chunk_size=chunk)
        else:
            def fast():
                return exact_divergence(velocity, z, chunk_size=chunk, colouring=colouring)
        coloured_s, (_, coloured, _) = median_seconds(fast, repeats)
    return {"batch": batch, "coordinates": z[0].numel(), "colours": int(colouring.max()) + 1, "chunk": chunk,
            "field": args["field"],
            "plain_s": plain_s, "coloured_s": coloured_s, "speed_up": plain_s / coloured_s,
            "max_difference": float((plain - coloured).abs().max())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    row = measure(args.batch, args.repeats)
    print(f"digits CNF field ({CONFIG.relative_to(ROOT)}), batch {row['batch']}, one thread, chunk {row['chunk']}")
    print("| trace | vector-Jacobian products | seconds |")
    print("|---|---|---|")
    print(f"| one per coordinate | {row['coordinates']} | {row['plain_s']:.3f} |")
    fast = "one per colour" + (" (conv part) + closed form (MLP part)" if row["field"] == "conv_mlp" else "")
    print(f"| {fast} | {row['colours']} | {row['coloured_s']:.3f} |")
    print(f"speed-up {row['speed_up']:.2f}x; largest difference between the traces {row['max_difference']:.2e}")


if __name__ == "__main__":
    main()
