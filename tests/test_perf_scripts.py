"""The performance scripts run as their docstrings say: the GPU check refuses clearly without a GPU and runs every
configuration on the CPU in its dry-run mode; the throughput, overhead, CNF, trace-cost, conv time channel, toy-NLL,
likelihood-tolerance and peer benchmarks work end to end at small sizes. (The NFE and guidance sweeps:
tests/test_nfe_sweep.py and tests/test_guidance_sweep.py.) Scripts that are not about process-level behaviour run in
this process, through their ``main(argv)``, so that each costs seconds."""

from __future__ import annotations

import os
import re
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
def test_throughput_script_times_a_fit_window(tmp_path):
    result = run([sys.executable, str(BENCH / "throughput.py"), "--label", "t", "--config",
                  "experiments/toy2d/flow_matching.yaml", "--steps", "3", "--warmup", "2", "--",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                  "--trainer.default_root_dir", str(tmp_path)])  # its config.yaml: not in the checkout's runs/
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT t "))
    assert float(line.split("images/s=")[1].split()[0]) > 0 and "steps=3" in line


@pytest.mark.slow  # ~8 s: `make test-slow`
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


def _script(name: str):
    """``experiments/benchmarks/<name>.py`` as a module (its ``main(argv)`` is what ``python <script>`` runs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_cnf_benchmark_tiny_runs_both_tables(capsys):
    _script("cnf_benchmark").main(["--tiny"])
    out = capsys.readouterr().out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "fixed" not in line
            and "---" not in line and "hidden" not in line] == ["2", "4", "16"]
    assert "speed-up" in out and "total wall time" in out


@pytest.mark.timeout(300)
def test_trace_cost_runs_on_chosen_shapes(capsys):
    _script("trace_cost").main(["--shapes", "2", "1x8x8", "--batch", "2", "--repeats", "1", "--max-chunks", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |") or
            line.startswith("| 1x8x8 |")]
    assert len(rows) == 2 and rows[1].endswith("| all |")  # D = 64 fits one chunk of 64 rows


@pytest.mark.timeout(600)
def test_toy_nll_tiny_writes_both_tables(tmp_path):
    _script("toy_nll").main(["--tiny", "--out", str(tmp_path), "--jobs", "1"])
    report = (tmp_path / "toy_nll.md").read_text()
    assert "| 8gaussians | ours: realnvp | 3 |" in report and " exact |" in report
    # digits: the headline discrete bits/dim with its label, beside the baselines
    assert re.search(r"\| realnvp \| \d+\.\d{3} \| discrete, IW-\d+ bound \|", report)
    assert "baseline: independent pixels (digits)" in report


def test_likelihood_tolerance_script_reads_a_checkpoint_and_prints_a_row_per_tolerance(tmp_path, capsys):
    import torch

    from lightning_flows.checkpoints import MODEL_CLASS_KEY, model_class_name
    from lightning_flows.models import FlowMatching

    torch.manual_seed(0)
    model = FlowMatching((2,), backbone="mlp", hidden=16, depth=2)
    checkpoint = tmp_path / "fm.ckpt"
    torch.save({MODEL_CLASS_KEY: model_class_name(FlowMatching), "state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams), "datamodule_hyper_parameters": {"dataset": "8gaussians"}},
               checkpoint)
    _likelihood_tolerance_module().main([str(checkpoint), "--tolerances", "1e-4", "1e-2", "--max-examples", "50",
                                         "--batch-size", "50"])
    out = capsys.readouterr().out
    assert f"{checkpoint} (FlowMatching on 8gaussians, nats)" in out
    assert len(re.findall(r"tol 1e-0[24]: NFE +\d+", out)) == 2 and "(+0.00000)" in out


# ---- peers.py: its scratch venv, and our side of the likelihood comparison ----
@pytest.mark.timeout(300)
def test_peers_scratch_venv_sees_this_environment(tmp_path):
    """``peers.py --install`` from inside a virtual environment (``make install``'s): the scratch venv must import
    torch, lightning and lightning-flows (a plain ``--system-site-packages`` venv sees the base interpreter's
    packages instead). Made without pip here; --install makes it with pip and installs the peers into it."""
    python = _script("peers").make_scratch_venv(tmp_path / "venv", with_pip=False)
    # Where the venv's python finds each package (found, not imported: importing lightning costs seconds).
    code = ("import importlib.metadata as d, importlib.util as u; print(d.version('torch'), *(u.find_spec(m).origin "
            "for m in ('lightning', 'jsonargparse', 'torchdiffeq')))")
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert probe.returncode == 0, probe.stderr[-2000:]
    import importlib.metadata
    import importlib.util

    version, lightning_origin, *_ = probe.stdout.split()
    assert version == importlib.metadata.version("torch")
    assert lightning_origin == importlib.util.find_spec("lightning").origin
    assert _script("peers").make_scratch_venv(tmp_path / "venv", with_pip=False) == python  # reruns reuse it


def test_peers_likelihood_comparison_calls_our_log_prob_with_the_solver():
    import torch

    from lightning_flows.models import FlowMatching
    from lightning_flows.ode import SolverConfig

    torch.manual_seed(0)
    model = FlowMatching(data_shape=(2,), backbone="mlp", hidden=16, depth=2, likelihood_divergence="exact").eval()
    x = torch.randn(5, 2)
    log_p, nfe = _script("peers").exact_log_prob(model, x, SolverConfig(method="rk4", steps=3))
    assert log_p.shape == (5,) and log_p.isfinite().all() and nfe == 12  # the solver given, not the model's own


@pytest.mark.timeout(600)
def test_peers_benchmark_with_the_peers_installed(tmp_path):
    probe = run([sys.executable, "-c", "import torchcfm, flow_matching, normflows"])
    if probe.returncode != 0:
        pytest.skip("the peers are not installed here (peers.py --install puts them in a scratch venv)")
    result = run([sys.executable, str(BENCH / "peers.py"), "--rounds", "1", "--fm-train-steps", "2",
                  "--flow-steps", "8"], timeout=580)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([line for line in result.stdout.splitlines() if line.startswith("| ")]) == 6


@pytest.mark.timeout(300)
def test_trace_colouring_times_the_committed_field_both_ways(capsys):
    row = _script("trace_colouring").measure(batch=3, repeats=1)
    assert (row["coordinates"], row["colours"]) == (64, 25)  # 4 stacked 3x3 convolutions on 8x8
    assert row["max_difference"] < 1e-5 and row["plain_s"] > 0 and row["coloured_s"] > 0
    _script("trace_colouring").main(["--batch", "2", "--repeats", "1"])
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_conv_time_channel_times_both_forms_of_the_committed_field_and_restores_the_split_one(capsys):
    from lightning_flows.nn.ode_functions import ConcatConvField

    committed = ConcatConvField.forward
    script = _script("conv_time_channel")
    row = script.measure(train_batch=4, trace_batch=3, repeats=1)
    assert ConcatConvField.forward is committed
    # The two forms are one function: the same training loss and trace up to float rounding.
    assert row["train_max_difference"] < 1e-4 and row["trace_max_difference"] < 1e-4
    assert all(row[f"{what}_{name}_s"] > 0 for what in ("train", "trace") for name in ("concatenated", "split"))
    script.main(["--train-batch", "2", "--trace-batch", "2", "--repeats", "1"])
    assert "| training step, batch 2 |" in capsys.readouterr().out
