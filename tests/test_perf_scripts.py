"""The performance scripts run: the GPU check refuses clearly without a GPU and runs every configuration on
the CPU in its dry-run mode; the overhead, trace-cost and peer benchmarks work end to end (small sizes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "benchmarks"


def run(args, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_is_valid_bash_and_says_why_it_stops_without_a_gpu(tmp_path):
    assert run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    # A PATH holding bash's helpers but no nvidia-smi.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "python", "sed", "grep", "wc", "head", "tail", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = run([shutil.which("bash"), str(BENCH / "gpu_check.sh")], {"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert "nvidia-smi not found" in result.stderr and "--dry-run" in result.stderr
    bad = run(["bash", str(BENCH / "gpu_check.sh"), "--fast"])
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gpu_check_dry_run_prints_a_line_per_configuration():
    result = run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], {"STEPS": "1", "WARMUP": "1"}, timeout=1400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "images/s=" in line]
    assert len(lines) == 10 and all("peak_mem_MiB=" in line for line in lines)
    assert "DDP ratio skipped" in result.stdout


@pytest.mark.timeout(600)
def test_throughput_script_times_a_fit_window():
    result = run([sys.executable, str(BENCH / "throughput.py"), "--label", "t", "--config",
                  "experiments/toy2d/flow_matching.yaml", "--steps", "3", "--warmup", "2", "--",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT t "))
    assert float(line.split("images/s=")[1].split()[0]) > 0 and "steps=3" in line


@pytest.mark.timeout(600)
def test_overhead_benchmark_reports_its_ratios():
    result = run([sys.executable, str(BENCH / "overhead.py"), "--cases", "toy2d_realnvp", "--rounds", "1",
                  "--steps", "5", "--bare"])
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| toy2d_realnvp")]
    assert len(table) == 2 and all(line.count("|") == 8 for line in table)  # CPU and wall clocks


@pytest.mark.timeout(600)
def test_peers_benchmark_skips_absent_peers_cleanly():
    probe = run([sys.executable, "-c", "import torchcfm, flow_matching, normflows"])
    if probe.returncode == 0:
        pytest.skip("the peers are installed here; the skip path cannot be exercised")
    result = run([sys.executable, str(BENCH / "peers.py"), "--rounds", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped: torchcfm is not installed" in result.stdout


def _likelihood_tolerance_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("likelihood_tolerance", BENCH / "likelihood_tolerance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_likelihood_tolerance_table_loosens_the_solver_and_restores_it():
    import torch

    from lightning_flows.data import GenerativeDataModule
    from lightning_flows.models import FlowMatching, RealNVP

    torch.manual_seed(0)
    model = FlowMatching(data_shape=(2,), backbone="mlp", hidden=32, depth=2)
    datamodule = GenerativeDataModule("8gaussians", n_val=200)
    before = model.likelihood_solver
    rows = _likelihood_tolerance_module().tolerance_rows(model, datamodule, [1e-6, 1e-4, 1e-2], max_examples=100,
                                                         batch_size=50)
    tight, middle, loose = rows
    assert loose["nfe"] < middle["nfe"] < tight["nfe"]  # the tolerance reached the solver
    assert tight["exact_change"] == 0.0 and loose["exact_change"] == loose["exact"] - tight["exact"]
    assert abs(middle["exact_change"]) < abs(loose["exact_change"])  # a tighter solve is nearer the reference
    assert model.likelihood_solver == before
    with pytest.raises(ValueError, match="no ODE likelihood_solver"):
        _likelihood_tolerance_module().tolerance_rows(RealNVP(data_shape=(2,)), datamodule, [1e-5])
