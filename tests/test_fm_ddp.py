"""OT-coupled flow matching under 2-rank gloo DDP: per-rank noise, reproducible from the seed, replicas in sync."""

import os
import sys
from pathlib import Path

import pytest
import torch

from subprocess_runs import run as run_process
from lightning_flows.flow_matching import MinibatchOTCoupling, TimeSampler, TrainingBatchDraw, batch_generator

PROBE = Path(__file__).with_name("fm_ddp_probe.py")


@pytest.mark.slow  # a feature under 2 DDP ranks, in `make test-slow` (keeps `make test` under 10 min)
@pytest.mark.timeout(300)
def test_ot_coupling_draws_different_reproducible_noise_on_each_rank(tmp_path):
    steps = 3
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, str(PROBE), str(tmp_path), str(steps)], timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    (x0_a, x1_a, t_a), (x0_b, x1_b, t_b) = ranks[0]["batches"], ranks[1]["batches"]
    assert x0_a.shape == (steps, 32, 2)
    assert not torch.allclose(x0_a, x0_b) and not torch.allclose(t_a, t_b) and not torch.allclose(x1_a, x1_b)

    # Each rank's batch i is exactly the OT draw from the generator of (data seed 3, epoch 0, rank, i).
    draw = TrainingBatchDraw(MinibatchOTCoupling(8), TimeSampler())
    for rank, (x0, x1, t) in enumerate([ranks[0]["batches"], ranks[1]["batches"]]):
        for i in range(steps):
            expected = draw(x1[i], batch_generator(3, 0, rank, i))
            assert torch.equal(expected.x0, x0[i]) and torch.equal(expected.t, t[i])

    for name, weight in ranks[0]["state_dict"].items():
        assert torch.equal(weight, ranks[1]["state_dict"][name]), name
