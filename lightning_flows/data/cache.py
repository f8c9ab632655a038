"""The data cache: folder indexes and streaming shards, built once by whichever process gets there first.

Every entry is a file or directory named by a key (a hash of what defines its contents). It is built under a
file lock into a temporary name beside its final one and renamed into place (atomic on one filesystem), so a
reader sees a complete entry or none, concurrent first runs (two jobs, every rank of a DDP job) build it once,
and a run killed mid-build leaves only a temporary that the next build removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

from filelock import FileLock

from lightning_flows.metrics.classifier import default_cache_dir  # the one cache root (evaluation's too)
from lightning_flows.run_checks import unwritable_reason


class DataSourceError(ValueError):
    """Data that cannot be used as configured, with the fix in the message."""


def data_cache_dir(cache_dir: str | Path | None) -> Path:
    """``<cache_dir>/data`` (default: ``$LIGHTNING_FLOWS_CACHE`` or ``~/.cache/lightning_flows``), created and
    checked writable (a clear error naming ``--data.cache_dir`` if not)."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    directory = root / "data"
    reason = unwritable_reason(directory)
    if reason is not None:
        raise DataSourceError(f"Cannot write to the data cache {directory} ({reason}); user data is indexed (and "
                              f"streamed) from there. Pass a writable directory with --data.cache_dir DIR (or set "
                              f"LIGHTNING_FLOWS_CACHE).")
    return directory


def content_key(identity: dict) -> str:
    """16 hex digits naming everything in ``identity`` (JSON-serialisable)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(name: str) -> str:
    """A dataset name or path as a short file-name-safe word: ``/data/my images/`` -> ``my_images``."""
    base = Path(str(name).rstrip("/\\")).name or str(name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._") or "data"


def build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """``final`` if it exists, else ``build(tmp)`` then rename ``tmp`` to ``final``, under ``final``'s lock.

    ``build`` writes a file or a directory at the path it is given.
    """
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.exists():  # another process built it while this one waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
    return final
