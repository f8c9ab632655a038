"""Can MeanFlow's network represent a good one-step map? Distil it from the model's own few-step map and score both.

    python experiments/benchmarks/meanflow_distill.py CKPT [--jumps 8] [--steps 3000]

``CKPT``: a toy MeanFlow checkpoint (``lightning-flows fit --config experiments/toy2d/meanflow.yaml``, or a run of
``experiments/suites/one_step.yaml``). A fresh copy of its network (same backbone options, seed 0) is trained by plain
regression, ``u(z, 0, 1) = M_k(z) - z`` with ``M_k`` the checkpoint's ``k``-jump map from fresh noise ``z`` (batch 512,
Adam at the config's learning rate, cosine schedule, its warm-up and clipping). Then the shared evaluator scores the
checkpoint's 1 and k jumps and the distilled one step on 2,000 samples against the test points (energy distance, MMD
and CE gap, each beside the real-vs-real null). If the distilled step is as good as the k jumps while the checkpoint's
one step is not, the network can represent the map and MeanFlow's training signal is what stands in the way.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable without `pip install -e .`

import torch  # noqa: E402

from lightning_flows.checkpoints import load_model_and_data  # noqa: E402
from lightning_flows.evaluation import EvaluationSpec, Evaluator  # noqa: E402
from lightning_flows.models import MeanFlow  # noqa: E402
from lightning_flows.models.base import GenerativeModel  # noqa: E402
from lightning_flows.models.meanflow import sampling_steps  # noqa: E402

KEYS = ("energy_distance", "mmd", "ce_gap_nats", "precision", "recall", "modes_hit", "good_fraction")


class OneStep(GenerativeModel):
    """A one-step sampler ``x = z + u(z, 0, 1)`` around a MeanFlow network (what the evaluator samples)."""

    def __init__(self, network: torch.nn.Module, dim: int):
        super().__init__((dim,))
        self.network = network

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, *self.data_shape)
        self.last_sample_nfe = 1
        return z + self.network(z, 0.0, None, interval=1.0)


def distil(teacher: MeanFlow, jumps: int, steps: int, batch: int) -> OneStep:
    torch.manual_seed(0)
    student = MeanFlow(teacher.data_shape, backbone=teacher.backbone_options).velocity
    hp = teacher.hparams
    optimizer = torch.optim.Adam(student.parameters(), lr=hp.lr)
    warmup = max(1, hp.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    grid = torch.linspace(0.0, 1.0, jumps + 1).tolist()
    for step in range(steps):
        z = torch.randn(batch, *teacher.data_shape)
        with torch.no_grad():  # the teacher's k-jump map of this z (MeanFlow.sample's grid)
            x = z
            for a, b in zip(grid[:-1], grid[1:]):
                x = x + (b - a) * teacher.average_velocity(x, a, b)
        loss = ((z + student(z, 0.0, None, interval=1.0) - x) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.5f}", file=sys.stderr)
    return OneStep(student, teacher.dim)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--jumps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=512)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    teacher, datamodule = load_model_and_data(opts.checkpoint)
    if not isinstance(teacher, MeanFlow) or len(teacher.data_shape) != 1:
        raise SystemExit(f"{opts.checkpoint}: a toy (2D) MeanFlow checkpoint is needed, got {type(teacher).__name__} "
                         f"on data of shape {teacher.data_shape}.")
    teacher.eval()
    spec = EvaluationSpec(n_samples=2000, likelihood=False, timing=False, progress=False)
    out = {"checkpoint": opts.checkpoint, "jumps": opts.jumps, "distillation_steps": opts.steps}
    for name, steps in (("checkpoint, 1 jump", 1), (f"checkpoint, {opts.jumps} jumps", opts.jumps)):
        with sampling_steps(teacher, steps):
            result = Evaluator(spec).evaluate(teacher, datamodule, run_seed=0)
        out[name] = {key: result[key] for key in KEYS if key in result}
    student = distil(teacher, opts.jumps, opts.steps, opts.batch)
    result = Evaluator(spec).evaluate(student, datamodule, run_seed=0)
    out["distilled one step"] = {key: result[key] for key in KEYS if key in result}
    out["null"] = {key: [result[f"{key}_null_mean"], result[f"{key}_null_std"]]
                   for key in ("energy_distance", "mmd", "ce_gap_nats") if f"{key}_null_mean" in result}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
