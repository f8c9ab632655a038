"""What a benchmark result was produced with: package versions, git commit, hardware."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("lightning-flows", "torch", "lightning", "torchdiffeq", "torchmetrics", "torch-fidelity", "numpy",
            "scipy", "wandb")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(root: str | Path = ".") -> str:
    """``<sha>`` or ``<sha>+dirty`` of the working tree, or ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def hardware() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def describe_device() -> str:
    """One line for table headers, e.g. ``CPU, 2 threads`` or ``1x NVIDIA H200``."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(root: str | Path = ".") -> dict:
    return {"packages": package_versions(), "git_commit": git_commit(root), "hardware": hardware()}


def script_environment(root: str | Path, accelerator: str, threads: int, note: str = "") -> dict:
    """What a measurement script records beside its numbers: device, threads, versions, commit, date, the
    machine's load when it started (a loaded machine slows every timing) and a free-text note."""
    import time

    return {"device": describe_device() if accelerator != "cpu" else "CPU", "threads": threads,
            "cpu_count": os.cpu_count(), "versions": package_versions(), "commit": git_commit(root),
            "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()[0], "note": note}
