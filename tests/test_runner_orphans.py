"""A benchmark worker stops when the suite process is killed (SIGKILL reaches only the parent), so a rerun
does not compete with orphaned runs for the cores."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from subprocess_runs import ROOT, python_env

PARENT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from lightning_flows.benchmark.runner import _exit_with_parent

    def worker(parent, ready):
        _exit_with_parent(parent, interval=0.05)
        ready.set()
        time.sleep(60)  # a long training run

    if __name__ == "__main__":
        context = multiprocessing.get_context("spawn")
        ready = context.Event()
        child = context.Process(target=worker, args=(os.getpid(), ready))
        child.start()
        ready.wait(120)  # the child's imports (torch, Lightning) take a while on a busy machine
        print(child.pid, flush=True)
        time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_worker_exits_when_the_suite_process_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env=python_env())
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
