"""What splitting the conv field's time channel saves on the digits CNF, measured in one run.

    python experiments/benchmarks/conv_time_channel.py                  # the committed config, batches 64 / 500
    python experiments/benchmarks/conv_time_channel.py --train-batch 4 --trace-batch 4 --repeats 1

Each layer of :class:`lightning_flows.nn.ode_functions.ConcatConvField` is defined as the 3x3 convolution of
``[h, t]``, the time as a constant extra channel. The field computes it as ``conv_h(h) + t * conv_t(ones)``: the
same numbers with 16 input channels instead of 17, which oneDNN runs much faster on CPU. This script times both
forms on the field of ``experiments/digits/cnf.yaml`` (random weights: the cost does not depend on them), on one
intra-op thread, as the suites run it:

* one training step (the config's Hutchinson loss with RNODE penalties through its fixed rk4 solve, and the
  backward pass) at the config's batch ``--train-batch``;
* one exact trace ``Tr(df/dz)`` (the conv part's coloured vector-Jacobian products plus the MLP's closed form)
  under ``torch.no_grad`` at the suites' likelihood batch ``--trace-batch``.

Runs the two forms in turn, ``--repeats`` pairs after a warm-up, and prints each one's median seconds, the median of
the pairs' ratios concatenated / split, and the largest difference between the two forms' values (float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

import torch  # noqa: E402
import yaml  # noqa: E402

from lightning_flows.models import CNF  # noqa: E402
from lightning_flows.nn.ode_functions import ConcatConvField  # noqa: E402
from lightning_flows.nn.time_embedding import broadcast_time  # noqa: E402

CONFIG = ROOT / "experiments" / "digits" / "cnf.yaml"


def concatenated_forward(self: ConcatConvField, x, t, y=None):
    """The layer as defined, the time concatenated as a channel: the reference the split form is timed against."""
    t = broadcast_time(t, x.shape[0], x)
    t_channel = t[:, None, None, None].expand(x.shape[0], 1, *x.shape[2:])
    h = x
    for i, conv in enumerate(self.convs):
        h = conv(torch.cat([h, t_channel], dim=1))
        if y is not None:
            h = h + self.class_shifts[i][y][:, :, None, None]
        if i < len(self.convs) - 1:
            h = self.act(h)
    return h


@contextlib.contextmanager
def form(name: str):
    """``split`` (the committed forward) or ``concatenated`` (the reference above) for every ConcatConvField."""
    committed = ConcatConvField.forward
    if name == "concatenated":
        ConcatConvField.forward = concatenated_forward
    try:
        yield
    finally:
        ConcatConvField.forward = committed


def paired_seconds(fn, repeats: int) -> tuple[dict, dict]:
    """Time ``fn`` under both forms in turn (concatenated, split, concatenated, ...) after a warm-up of each, so that
    a drift in the machine's speed hits both alike: ``({form: [seconds]}, {form: last value})``."""
    seconds, values = {"concatenated": [], "split": []}, {}
    for round_ in range(repeats + 1):
        for name in seconds:
            with form(name):
                start = time.perf_counter()
                values[name] = fn()
                if round_:  # round 0 warms up
                    seconds[name].append(time.perf_counter() - start)
    return seconds, values


def measure(train_batch: int, trace_batch: int, repeats: int, config: Path = CONFIG) -> dict:
    args = dict(yaml.safe_load(config.read_text())["model"]["init_args"])
    torch.manual_seed(0)
    model = CNF((1, 8, 8), **args)
    x = torch.rand(train_batch, 1, 8, 8)
    z = torch.randn(trace_batch, 1, 8, 8)
    t = torch.tensor(0.5)

    def train_step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same Hutchinson probe for both forms
        loss = model.training_loss(x)
        loss.backward()
        return loss.detach()

    def trace():
        with torch.no_grad():
            return model.field.velocity_and_divergence(z, t, chunk_size=args.get("trace_chunk_size"))[1]

    row = {"field": args["field"], "train_batch": train_batch, "trace_batch": trace_batch}
    for what, fn in (("train", train_step), ("trace", trace)):
        seconds, values = paired_seconds(fn, repeats)
        for name, times in seconds.items():
            row[f"{what}_{name}_s"] = statistics.median(times)
        # The median of the pairs' ratios: each pair ran back to back.
        row[f"{what}_ratio"] = statistics.median(a / b for a, b in zip(seconds["concatenated"], seconds["split"]))
        row[f"{what}_max_difference"] = float((values["concatenated"] - values["split"]).abs().max())
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batch", type=int, default=64, help="the suites' digits batch")
    parser.add_argument("--trace-batch", type=int, default=500, help="the suites' likelihood batch")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    row = measure(args.train_batch, args.trace_batch, args.repeats)
    print(f"digits CNF ({row['field']} field of {CONFIG.relative_to(ROOT)}), one thread, "
          f"median of {args.repeats} pairs:")
    print("| what | concatenated [h, t] s | split conv_h(h) + t conv_t(1) s | ratio | max difference |")
    print("|---|---|---|---|---|")
    for what, label in (("train", f"training step, batch {row['train_batch']}"),
                        ("trace", f"exact trace, batch {row['trace_batch']}")):
        print(f"| {label} | {row[f'{what}_concatenated_s']:.4f} | {row[f'{what}_split_s']:.4f} | "
              f"{row[f'{what}_ratio']:.2f}x | {row[f'{what}_max_difference']:.1e} |")


if __name__ == "__main__":
    main()
