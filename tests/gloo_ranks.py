"""Tests that start their own gloo ranks (``torch.multiprocessing.spawn``), with a deterministic start and end.

:func:`run_ranks` runs ``worker(rank, world, *args)`` on ``world`` spawned processes joined in one gloo process
group. Every such test goes through it, because each way it used to do this could fail on a busy machine:

* **start**: a file rendezvous in the test's own directory, not a TCP port. A port picked "free" can be taken by
  another process (other test runs share the machine) before rank 0 binds it.
* **end**, in this order on every rank:
  1. ``gc.collect()``: a ``DistributedDataParallel`` module (its reducer, autograd hooks) sits in reference
     cycles that keep the process group alive past ``destroy_process_group``; left to the interpreter's
     shutdown, they are freed while gloo's threads still run, and the process dies of SIGABRT ("terminate
     called without an active exception"), at random;
  2. a barrier: no rank tears down while another is still in a collective;
  3. ``destroy_process_group()`` (and another collection of what it released);
  4. a file barrier: no process exits, closing its sockets, until every rank has destroyed its group.
  A rank whose worker raises skips 2 and 4 (it would wait for ranks that cannot come) and exits non-zero;
  ``spawn`` then ends the others and raises in the test.
"""

from __future__ import annotations

import datetime
import gc
import time
import uuid
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

# Generous: on a contended 2-core machine a rank can lag the other by tens of seconds. A real hang still ends.
TIMEOUT = datetime.timedelta(seconds=300)


def run_ranks(worker, *args, directory: str | Path, world: int = 2) -> None:
    """Run ``worker(rank, world, *args)`` (a module-level function) on ``world`` gloo ranks; raises if any failed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    session = directory / f"gloo_{uuid.uuid4().hex[:8]}"  # a fresh rendezvous file and barrier names per call
    mp.spawn(_rank_main, args=(world, str(session), worker, args), nprocs=world, join=True)


def _rank_main(rank: int, world: int, session: str, worker, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{session}.rendezvous", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        worker(rank, world, *args)
        gc.collect()
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    gc.collect()
    _file_barrier(Path(f"{session}.destroyed"), rank, world)


def _file_barrier(prefix: Path, rank: int, world: int) -> None:
    Path(f"{prefix}.{rank}").touch()
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    while time.monotonic() < deadline and not all(Path(f"{prefix}.{r}").exists() for r in range(world)):
        time.sleep(0.05)
