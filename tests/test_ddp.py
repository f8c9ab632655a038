"""DDP on CPU: 2 processes, gloo. Ranks must see different data and end with identical weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROBE = Path(__file__).with_name("ddp_probe.py")


@pytest.mark.timeout(300)
def test_two_cpu_ranks_see_different_batches_and_end_with_identical_weights(tmp_path):
    steps = 5
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(PROBE), str(tmp_path), str(steps)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == steps

    # Different shards: no example is shared between the ranks' batches.
    seen0 = {tuple(row.tolist()) for row in rank0["batches"].reshape(-1, 2)}
    seen1 = {tuple(row.tolist()) for row in rank1["batches"].reshape(-1, 2)}
    assert len(seen0) == len(seen1) == steps * 64
    assert not seen0 & seen1

    # Gradients were all-reduced every step, so the replicas never drifted apart.
    for name, weight in rank0["state_dict"].items():
        assert torch.equal(weight, rank1["state_dict"][name]), name
    # ...and training actually moved them (the test would pass vacuously otherwise).
    from lightning_flows.models import FlowMatching

    torch.manual_seed(0)
    init = FlowMatching(data_shape=(2,), hidden=32, depth=2).state_dict()
    assert any(not torch.equal(init[k], rank0["state_dict"][k]) for k in init)
