"""DDP on CPU: 2 processes, gloo, every family through its committed config and the CLI's defaults.

Ranks must see different data, draw different noise, and end with identical weights (buffers included).
"""

import sys
from pathlib import Path

import pytest
import torch
from subprocess_runs import python_env, run

PROBE = Path(__file__).with_name("ddp_probe.py")
FAMILIES = ["vae", "gan", "realnvp", "glow", "cnf", "cnf_dropout", "diffusion", "flow_matching"]
STEPS = 3


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One subprocess that trains every family in sequence under DDP (2 ranks), as ddp_probe.py describes."""
    out = tmp_path_factory.mktemp("ddp")
    result = run([sys.executable, str(PROBE), str(out), str(STEPS)], timeout=540, env=python_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_cpu_ranks_see_different_data_draw_different_noise_and_end_identical(ddp_runs, family):
    rank0, rank1 = (torch.load(ddp_runs / f"{family}_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    optimizer_steps = 2 * STEPS if family == "gan" else STEPS  # a GAN batch is a D step and a G step
    assert rank0["global_step"] == rank1["global_step"] == optimizer_steps

    # Different shards: no example is shared between the ranks' batches.
    seen0 = {tuple(x.flatten().tolist()) for x in rank0["batches"].flatten(0, 1)}
    seen1 = {tuple(x.flatten().tolist()) for x in rank1["batches"].flatten(0, 1)}
    assert len(seen0) == len(seen1) == rank0["batches"].shape[0] * rank0["batches"].shape[1]
    assert not seen0 & seen1

    # Different noise: at every step the random numbers the model draws first differ between ranks
    # (with identical seeding, flow matching's x0, diffusion's eps, the VAE's and GAN's z would agree).
    assert rank0["noise"].shape == (STEPS, 4)
    assert (rank0["noise"] != rank1["noise"]).all()
    # ...and differ from step to step on one rank.
    assert len({tuple(row.tolist()) for row in rank0["noise"]}) == STEPS

    # Same start, gradients all-reduced every step, buffers synced at the end: identical replicas.
    for name, value in rank0["init"].items():
        assert torch.equal(value, rank1["init"][name]), name
    for name, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][name]), name
    # ...and training actually moved them (the test would pass vacuously otherwise).
    moved = [k for k, v in rank0["init"].items() if not torch.equal(v, rank0["state_dict"][k])]
    assert len(moved) >= len(rank0["init"]) // 2, moved


def test_every_ddp_run_left_its_last_checkpoint_and_final_samples(ddp_runs):
    for family in FAMILIES:
        assert len(list((ddp_runs / family).glob("*/version_0/checkpoints/last.ckpt"))) == 1, family
        assert len(list((ddp_runs / family).glob("*/version_0/samples/final.png"))) == 1, family
