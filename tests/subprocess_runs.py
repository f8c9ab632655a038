"""Running real training processes from tests: environment, and one retry when a TCP port was taken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Printed by torch/gloo when the rendezvous port picked by Lightning was taken by another process
# between being chosen and being bound (other test runs share the machine).
PORT_TAKEN = ("address already in use", "EADDRINUSE", "Address in use")


def python_env(**extra: str) -> dict[str, str]:
    """This checkout (and the tests' fault-injection callbacks) on the path, one thread per process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PL_GLOBAL_SEED", None)
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    """The `lightning-flows` command of this checkout."""
    return [sys.executable, "-m", "lightning_flows.cli", *args]


def run(command: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        ) -> subprocess.CompletedProcess:
    """Run ``command``; rerun it once if it failed only because its rendezvous port was taken."""
    for attempt in range(2):
        result = subprocess.run(command, env=env or python_env(), cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode == 0 or not any(s in result.stderr for s in PORT_TAKEN) or attempt:
            return result
    return result


def processes_in_group(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still alive (a job and everything it launched)."""
    try:
        os.killpg(pgid, 0)  # signal 0: only asks whether any process of the group is left
    except ProcessLookupError:
        return False
    return True
