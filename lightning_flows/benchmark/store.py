"""The benchmark's output directory: where each run's files are, who may write them, and how a finished
run is replaced without ever being lost. Several ``lightning-flows benchmark`` processes (on one machine,
or on several sharing the directory) may work on one ``--out`` at once.

Layout of ``<out>/``::

    runs/<slug>                   symlink to the attempt that finished last: the one place that says which
                                  result counts (``<slug>`` = ``<dataset>__<model>__seed<s>``)
    runs/<slug>.attempt-<id>/     one training attempt: Lightning's files (config.yaml, metrics.csv,
                                  checkpoints/) and, once it finished, samples.pt, samples.png, result.json
    locks/<slug>.lock             held (flock) by the process training that run
    locks/report.lock             held while the report (table, results.json, figures, samples/) is rebuilt

Rules that make the directory survive concurrent, failed and killed runs:

* Only the holder of ``locks/<slug>.lock`` writes anything of that run. ``flock`` locks belong to the open
  file, so the kernel releases them when their process dies (SIGKILL included): a lock is never stale.
* An attempt trains in a directory of its own, never in the finished one; a run directory is never renamed
  (Lightning records its paths in config.yaml and the checkpoints).
* The commit is one atomic step, :meth:`Claim.commit`: after every file of the attempt is fsynced, a new
  symlink replaces ``runs/<slug>`` (``os.replace``). Killed before it, the old run is untouched; killed
  after it, the new run is complete. What a kill leaves behind (an unfinished attempt, the superseded
  attempt, a temporary link) is never pointed to, and is deleted the next time any process claims the run.
* A failed attempt is deleted at once; the finished run it would have replaced stays as it was.

A run directory of an older version (a real directory ``runs/<slug>/``, its result in ``results/``) is not
recognised: the run is trained again, and the new attempt replaces it when it finishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

RESULT = "result.json"
ATTEMPT = ".attempt-"  # runs/<slug>.attempt-<id>
REPORT_LOCK = "report.lock"


def fsync_directory(directory: Path) -> None:
    """Make the creation, rename or removal of an entry of ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``path`` holds either its old contents or all of ``data``, also after a crash (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new contents to (by a library that wants a file name, e.g.
    ``savefig``): a file in the same directory, fsynced and renamed over ``path`` (``os.replace``) when the
    block ends without an error, then the directory is fsynced; a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp{path.suffix}"  # the suffix tells savefig the format
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (the commit must not point at data still in flight)."""
    for parent, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(Path(parent))


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when there is none (missing, unreadable, not an object). A
    reader racing a commit may find the file it resolved deleted under it: it retries once."""
    for _ in range(2):
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None
    return None


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lock, as that process wrote it into the lock file."""

    pid: int | None
    host: str
    since: float | None

    def describe(self) -> str:
        if self.pid is None:
            return "another process"
        started = time.strftime("%H:%M:%S", time.localtime(self.since)) if self.since else "?"
        return f"process {self.pid} on {self.host} (since {started})"


class Store:
    """``<out>/`` of a benchmark (see the module docstring)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.runs = self.out / "runs"
        self.locks = self.out / "locks"

    # --- reading -------------------------------------------------------------------------------------
    def link(self, slug: str) -> Path:
        """``runs/<slug>``: the finished run (a symlink), when there is one."""
        return self.runs / slug

    def stored(self, slug: str) -> dict | None:
        """The result the finished run of ``slug`` holds, whatever settings produced it."""
        link = self.link(slug)
        if not link.is_symlink():
            return None  # nothing finished, or an older version's directory (not recognised, see above)
        return read_json(link / RESULT)

    def finished(self, slug: str, key: str) -> dict | None:
        """The result of ``slug`` if it was produced by exactly the settings whose hash is ``key``."""
        row = self.stored(slug)
        return row if row is not None and row.get("key") == key else None

    # --- writing -------------------------------------------------------------------------------------
    def claim(self, slug: str) -> Claim | Holder:
        """Take the run's lock without waiting: a :class:`Claim` (use it as a context manager), or the
        :class:`Holder` of the lock when another process has it."""
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / f"{slug}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(),
                  0)
        claim = Claim(self, slug, fd)
        claim.remove_leftovers()
        return claim

    def remove_report_leftovers(self) -> None:
        """Delete the temporary files of report writers that were killed. Call under the exclusive report lock
        (the report's files are only written under it)."""
        for directory in (self.out, self.out / "samples"):
            for tmp in directory.glob(".*.tmp*") if directory.is_dir() else ():
                tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def report_lock(self, shared: bool = False) -> Iterator[None]:
        """Exclusive while a report is rebuilt (it reads every run); shared while a commit replaces a run, so
        that a report never reads a run directory being deleted."""
        self.locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.locks / REPORT_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _read_holder(fd: int) -> Holder:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return Holder(int(info["pid"]), str(info.get("host", "?")), float(info.get("since") or 0) or None)
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(None, "", None)  # the holder has not written its name yet


class Claim:
    """The lock on one run, held by this process: fresh attempt directories, the commit, and clean-up."""

    def __init__(self, store: Store, slug: str, fd: int):
        self.store, self.slug, self._fd = store, slug, fd

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _current_target(self) -> str | None:
        link = self.store.link(self.slug)
        return os.readlink(link) if link.is_symlink() else None

    def remove_leftovers(self) -> None:
        """Delete what killed processes left of this run: attempts nobody points to, temporary links. Safe
        because only the lock holder (this process) writes this run's files."""
        if not self.store.runs.is_dir():
            return
        keep = self._current_target()
        for entry in self.store.runs.iterdir():
            if entry.name.startswith(f"{self.slug}{ATTEMPT}") and entry.name != keep:
                _remove(entry)
            elif entry.name.startswith(f".{self.slug}.link-"):
                entry.unlink(missing_ok=True)

    def new_attempt(self, attempt_id: str) -> Path:
        """A fresh, empty directory for one training attempt: ``runs/<slug>.attempt-<attempt_id>``."""
        directory = self.store.runs / f"{self.slug}{ATTEMPT}{attempt_id}"
        if directory.name == self._current_target():
            raise RuntimeError(f"attempt id {attempt_id} is that of the finished run {directory}; use a new one.")
        _remove(directory)  # only a leftover of this same attempt id can be there
        directory.mkdir(parents=True)
        return directory

    def commit(self, attempt: Path, row: dict) -> None:
        """Publish ``attempt`` as the finished run with result ``row``, replacing the previous one atomically.

        1. ``result.json`` is written into the attempt and every file of the attempt is fsynced;
        2. a new symlink ``.<slug>.link-<pid>`` -> attempt replaces ``runs/<slug>`` (``os.replace``: the
           commit), and the directory entry is fsynced;
        3. the superseded attempt is deleted (a kill before that leaves it to :meth:`remove_leftovers`).
        """
        runs, link = self.store.runs, self.store.link(self.slug)
        atomic_write_text(attempt / RESULT, json.dumps(row, indent=1, default=str) + "\n")
        fsync_tree(attempt)
        tmp_link = runs / f".{self.slug}.link-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        os.symlink(attempt.name, tmp_link)  # relative: <out> may be moved or copied
        with self.store.report_lock(shared=True):
            previous = self._current_target()
            if link.exists() and not link.is_symlink():
                # An older version's real directory: move it aside (a kill right here leaves no finished run;
                # the next claim deletes both directories and the run is trained again).
                aside = runs / f"{self.slug}{ATTEMPT}legacy-{os.getpid()}"
                os.replace(link, aside)
                previous = aside.name
            os.replace(tmp_link, link)
            fsync_directory(runs)
            if previous and previous != attempt.name:
                _remove(runs / previous)

    def discard(self, attempt: Path) -> None:
        """Delete an attempt that did not finish (never the finished run it would have replaced)."""
        if attempt.name != self._current_target():
            _remove(attempt)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
