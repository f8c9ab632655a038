"""TarFlow and MeanFlow under DDP on 2 CPU ranks (gloo), unconditional and class-conditional, through the CLI: the
ranks train on disjoint shards (each image with its own label), draw different noise, and end with identical
weights that training moved, the class embeddings included."""

import sys
from pathlib import Path

import pytest
import torch
from ddp_probe import NEW_FAMILIES as RUNS
from subprocess_runs import python_env, run

PROBE = Path(__file__).with_name("ddp_probe.py")
STEPS = 3


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("newfam_ddp")
    result = run([sys.executable, str(PROBE), str(out), str(STEPS), *RUNS], timeout=500, env=python_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.timeout(560)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_cpu_ranks_shard_the_data_draw_their_own_noise_and_end_identical(ddp_runs, name):
    rank0, rank1 = (torch.load(ddp_runs / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == STEPS
    # Disjoint shards: no example is shared between the ranks' batches.
    seen = [{tuple(x.flatten().tolist()) for x in rank["batches"].flatten(0, 1)} for rank in (rank0, rank1)]
    assert len(seen[0]) == len(seen[1]) == STEPS * rank0["batches"].shape[1] and not seen[0] & seen[1]
    # Per-rank noise, fresh at every step.
    assert (rank0["noise"] != rank1["noise"]).all()
    assert len({tuple(row.tolist()) for row in rank0["noise"]}) == STEPS
    # Same start, all-reduced gradients: identical replicas, and training moved them.
    for key, value in rank0["init"].items():
        assert torch.equal(value, rank1["init"][key]), key
    for key, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][key]), key
    moved = [k for k, v in rank0["init"].items() if not torch.equal(v, rank0["state_dict"][k])]
    assert len(moved) >= len(rank0["init"]) // 2, moved
    if name.endswith("_conditional"):
        assert rank0["labels"] is not None and rank0["labels"].shape == rank0["batches"].shape[:2]
        assert any("class_embed" in k for k in moved), "the class embedding was not trained"


def test_every_ddp_run_left_its_last_checkpoint_and_final_samples(ddp_runs):
    for name in RUNS:
        assert len(list((ddp_runs / name).glob("*/version_0/checkpoints/last.ckpt"))) == 1, name
        assert len(list((ddp_runs / name).glob("*/version_0/samples/final.png"))) == 1, name
