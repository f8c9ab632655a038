"""What an exact likelihood costs against the dimension D: the trace term of the ODE likelihood.

    python experiments/benchmarks/trace_cost.py                  # the table in experiments/PERFORMANCE.md
    python experiments/benchmarks/trace_cost.py --batch 8 --max-chunks 2
    python experiments/benchmarks/trace_cost.py --shapes 2 1x8x8 --batch 2 --repeats 1   # seconds

One evaluation of the likelihood ODE's right-hand side (what every solver step calls) for flow matching's
default backbones (the toy2d MLP, the UNet at 1x8x8, 1x16x16, 1x28x28 and 3x32x32), per example, for:

* ``forward``: the velocity alone (what sampling pays);
* ``hutchinson``: one vector-Jacobian product (Hutchinson's unbiased estimate of the trace);
* ``exact``: ``D`` vector-Jacobian products, ``chunk`` rows at a time (:func:`lightning_flows.ode.exact_divergence`).

Exact rows cost the same whatever their index, so for large ``D`` only ``--max-chunks`` chunks are timed
and the total is that time times ``D / rows timed`` (marked "extrapolated"). Each number is the median of
``--repeats`` calls after one warm-up, one intra-op thread, under ``torch.no_grad`` as in evaluation.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import torch  # noqa: E402

from lightning_flows.nn import make_time_backbone  # noqa: E402
from lightning_flows.ode import exact_divergence, hutchinson_divergence, sample_probe  # noqa: E402

SHAPES = [(2,), (1, 8, 8), (1, 16, 16), (1, 28, 28), (3, 32, 32)]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape: tuple[int, ...], batch: int, chunk: int, max_chunks: int, repeats: int) -> dict:
    torch.manual_seed(0)
    net = make_time_backbone(shape, "auto").eval()
    z = torch.randn(batch, *shape)
    t = torch.tensor(0.5)
    dim = math.prod(shape)
    probe = sample_probe(z)

    def field(x):
        return net(x, t)

    rows = min(dim, chunk * max_chunks)

    def exact_rows():
        if rows == dim:
            return exact_divergence(field, z, chunk_size=chunk)
        return _exact_first_rows(field, z, rows, chunk)

    with torch.no_grad():
        forward = median_seconds(lambda: field(z), repeats)
        hutchinson = median_seconds(lambda: hutchinson_divergence(field, z, probe), repeats)
        exact = median_seconds(exact_rows, repeats) * dim / rows
    return {"shape": shape, "dim": dim, "batch": batch, "chunk": chunk, "rows_timed": rows,
            "forward_ms": 1e3 * forward / batch, "hutchinson_ms": 1e3 * hutchinson / batch,
            "exact_ms": 1e3 * exact / batch}


def _exact_first_rows(field, z: torch.Tensor, rows: int, chunk: int):
    """The first ``rows`` Jacobian rows exactly as :func:`exact_divergence` computes them (same vjp, same
    vmap chunks), for timing a large ``D`` on a subset of rows."""
    from torch.func import vjp, vmap

    batch, dim = z.shape[0], z[0].numel()
    _, vjp_fn = vjp(field, z)
    batched = vmap(lambda c: vjp_fn(c)[0].reshape(batch, dim))
    total = z.new_zeros(batch)
    for start in range(0, rows, chunk):
        index = torch.arange(start, min(start + chunk, rows))
        one_hot = torch.zeros(len(index), dim)
        one_hot[torch.arange(len(index)), index] = 1.0
        jac = batched(one_hot[:, None, :].expand(len(index), batch, dim).reshape(len(index), *z.shape))
        total = total + jac[torch.arange(len(index)), :, index].sum(0)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["x".join(map(str, s)) for s in SHAPES],
                        help="data shapes, e.g. 2 1x8x8 3x32x32 (default: all of the table)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64, help="exact-trace rows per vectorised chunk")
    parser.add_argument("--max-chunks", type=int, default=4, help="chunks timed per shape (rest extrapolated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    print(f"# trace cost: torch {torch.__version__}, {opts.threads} thread(s), batch {opts.batch}, "
          f"chunk {opts.chunk}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| data shape | D | forward (ms/example) | Hutchinson (ms/example) | exact (ms/example) | "
          "exact / Hutchinson | rows timed |")
    print("|---|---|---|---|---|---|---|")
    for shape in [tuple(int(n) for n in text.split("x")) for text in opts.shapes]:
        r = measure(shape, opts.batch, opts.chunk, opts.max_chunks, opts.repeats)
        timed = "all" if r["rows_timed"] == r["dim"] else f"{r['rows_timed']} (extrapolated)"
        print(f"| {'x'.join(map(str, shape))} | {r['dim']} | {r['forward_ms']:.3f} | {r['hutchinson_ms']:.3f} | "
              f"{r['exact_ms']:.2f} | {r['exact_ms'] / r['hutchinson_ms']:.0f}x | {timed} |", flush=True)


if __name__ == "__main__":
    main()
