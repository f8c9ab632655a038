"""DDP faults and multi-node launches, with real processes.

Faults injected: an exception on rank 1, and on rank 0 (the launching process), of a 2-rank CPU job in
the middle of training. What must survive: nothing hangs; every process exits, non-zero, promptly.
Multi-node: two launches of the same command with ``--trainer.num_nodes 2`` (node ranks 0 and 1, gloo on
localhost), in each documented way -- Lightning's own launcher with MASTER_ADDR/MASTER_PORT/NODE_RANK,
torchrun, and SLURM's srun environment -- which must train together and end identical.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from subprocess_runs import PORT_TAKEN, ROOT, cli, processes_in_group, python_env

TOY = str(ROOT / "experiments/toy2d/flow_matching.yaml")
SMALL = ["--model.init_args.hidden", "32", "--sample_grid.n", "16", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
         "--trainer.limit_val_batches", "0"]


def _dirs(root: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


@pytest.mark.timeout(240)
# Rank 0 failing is the same code path with the roles swapped: `make test-slow` (keeps `make test` under 10 min).
@pytest.mark.parametrize("failing_rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_an_exception_on_one_rank_ends_the_whole_job_promptly_and_non_zero(tmp_path, failing_rank):
    marker = tmp_path / "failed_at"
    command = cli("fit", "--config", TOY, *SMALL, *_dirs(tmp_path), "--trainer.devices", "2",
                  "--trainer.max_steps", "100000", "--trainer.max_epochs", "-1",
                  "--trainer.callbacks+=fault_injection.RaiseAtStep", "--trainer.callbacks.step", "3",
                  "--trainer.callbacks.rank", str(failing_rank), "--trainer.callbacks.marker", str(marker))
    job = subprocess.Popen(command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own process group: every rank it launches
    try:
        output, _ = job.communicate(timeout=180)
        while processes_in_group(job.pid):
            assert time.time() - float(marker.read_text()) < 60, "a rank is still running a minute after the failure"
            time.sleep(0.2)
        exited_after = time.time() - float(marker.read_text())
    finally:
        if processes_in_group(job.pid):
            os.killpg(job.pid, 9)
    assert job.returncode != 0
    assert f"injected failure on rank {failing_rank} at step 3" in output
    # gloo notices the lost peer at once; the launcher's watchdog polls every 5 s. Generous for a busy machine.
    assert exited_after < 45, f"every process exited only {exited_after:.0f} s after the failure"
    print(f"rank {failing_rank} failed; every process gone {exited_after:.1f} s later")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_command(launch: str, node_rank: int, port: str, fit_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one node, as each documented way of launching sets them up."""
    if launch == "env":  # Lightning's own launcher: what a shell loop over hosts or a job system exports
        env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node_rank), WORLD_SIZE="2")
        return cli(*fit_args), env
    if launch == "torchrun":  # experiments/README.md: `torchrun --nnodes 2 --node_rank ... -m lightning_flows.cli`
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                   "-m", "lightning_flows.cli", *fit_args]
        return command, python_env()
    # launch == "slurm": what `srun` sets for each task of `#SBATCH --nodes=2 --ntasks-per-node=1`
    env = python_env(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(node_rank),
                     SLURM_LOCALID="0", SLURM_NODEID=str(node_rank), SLURM_JOB_ID="4242",
                     SLURM_JOB_NAME="lightning-flows-test", SLURM_NODELIST="127.0.0.1", MASTER_PORT=port)
    return cli(*fit_args), env


def _two_nodes(tmp_path: Path, steps: int, launch: str) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    nodes = []
    for node_rank in (0, 1):
        node_dir = tmp_path / f"node{node_rank}"
        fit_args = ["fit", "--config", TOY, *SMALL, *_dirs(node_dir), "--trainer.num_nodes", "2",
                    "--trainer.devices", "1", "--trainer.max_steps", str(steps),
                    "--trainer.callbacks+=fault_injection.DumpWeights", "--trainer.callbacks.out", str(tmp_path)]
        command, env = _node_command(launch, node_rank, port, fit_args)
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    for node in nodes:
        output, _ = node.communicate(timeout=200)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, output, output))
    return results


@pytest.mark.timeout(480)
# The environment launch runs by default; torchrun and SLURM variables (the same rendezvous from other
# variables) in `make test-slow`.
@pytest.mark.parametrize("launch", ["env", pytest.param("torchrun", marks=pytest.mark.slow),
                                    pytest.param("slurm", marks=pytest.mark.slow)])
def test_two_nodes_on_one_host_train_together_and_end_identical(tmp_path, launch):
    steps = 5
    results = _two_nodes(tmp_path, steps, launch)
    if any(r.returncode for r in results) and any(s in r.stdout for r in results for s in PORT_TAKEN):
        results = _two_nodes(tmp_path, steps, launch)  # the port we picked was taken meanwhile: once more
    for node_rank, result in enumerate(results):
        assert result.returncode == 0, f"node {node_rank}:\n{result.stdout[-3000:]}"
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (rank0["node_rank"], rank1["node_rank"]) == (0, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == steps
    for name, value in rank0["state_dict"].items():
        assert torch.equal(value, rank1["state_dict"][name]), name
    assert any(not torch.equal(v, rank0["state_dict"][k]) for k, v in rank0["init"].items())
    # Only global rank 0 writes the run's files.
    assert list((tmp_path / "node0").glob("*/version_0/checkpoints/last.ckpt"))
    assert not list((tmp_path / "node1").glob("**/*.ckpt"))
