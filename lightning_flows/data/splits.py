"""Train/val/test splits of user data, decided by each example's content, and the manifest that records them.

Every example carries a 16-byte digest of its content (a file's bytes, an array row's bytes). Its split is a
function of that digest alone:

* test  if ``u_test(digest) < test_fraction``, the same for every data seed (the evaluation reference never
  changes with the seed, as for the registered datasets);
* val   if not test and ``u_val(digest, seed) < val_fraction / (1 - test_fraction)`` (the seed redraws val);
* train otherwise,

where ``u`` are uniform numbers read from the digest (``u_val`` mixed with the seed by splitmix64). So the
splits are deterministic, disjoint, and stable when files are added or removed: an example keeps its split
whatever else is in the folder, and exact duplicates (same digest) always share one split, so a copy of a
test image is never trained on. The fractions hold in expectation (the counts are binomial).

A run writes its splits as a manifest (``data_splits.csv``: name, digest, split, label); passing that file
back (``--data.splits``) reproduces exactly the examples and splits of that run, leaving out files added since.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from lightning_flows.data.cache import DataSourceError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_CODE = {name: code for code, name in enumerate(SPLIT_NAMES)}
LEFT_OUT = -1  # an example the manifest does not list
DIGEST_BYTES = 16


def digest(data: bytes | memoryview) -> bytes:
    """The content digest of one example (BLAKE2b, 16 bytes)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def digests_of_rows(rows: np.ndarray) -> np.ndarray:
    """``(n, ...)`` array -> ``(n, 16)`` uint8 digests of each row's bytes."""
    rows = np.ascontiguousarray(rows)
    flat = rows.reshape(len(rows), -1).view(np.uint8)
    return np.frombuffer(b"".join(digest(row.data) for row in flat), np.uint8).reshape(len(rows), DIGEST_BYTES)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al.'s SplitMix64 finaliser), elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _uniform(words: np.ndarray) -> np.ndarray:
    """uint64 -> floats in [0, 1) from the top 53 bits."""
    return (words >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataSourceError(f"val_fraction={val_fraction} and test_fraction={test_fraction}: need 0 <= val_fraction, "
                         f"0 < test_fraction and val_fraction + test_fraction < 1 (the rest is trained on); set "
                         f"--data.val_fraction and --data.test_fraction.")


def assign_splits(digests: np.ndarray, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """``(n, 16)`` uint8 digests -> ``(n,)`` int8 split codes (0 train, 1 val, 2 test); see the module."""
    check_fractions(val_fraction, test_fraction)
    words = np.ascontiguousarray(digests).view("<u8")  # (n, 2): two independent 64-bit words per digest
    test = _uniform(words[:, 0]) < test_fraction
    salt = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    val = ~test & (_uniform(_splitmix64(words[:, 1] ^ salt)) < val_fraction / (1 - test_fraction))
    return np.where(test, SPLIT_CODE["test"], np.where(val, SPLIT_CODE["val"], SPLIT_CODE["train"])).astype(np.int8)


def write_manifest(path: str | Path, names: list[str], digests: np.ndarray, codes: np.ndarray,
                   labels: np.ndarray | None, class_names: list[str] | None = None) -> Path:
    """One CSV row per example (left-out examples omitted): ``name, digest (hex), split[, label]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "digest", "split"] + (["label"] if labels is not None else []))
        for i in np.flatnonzero(codes != LEFT_OUT):
            row = [names[i], digests[i].tobytes().hex(), SPLIT_NAMES[codes[i]]]
            if labels is not None:
                row.append(class_names[labels[i]] if class_names else int(labels[i]))
            writer.writerow(row)
    tmp.replace(path)
    return path


def splits_from_manifest(path: str | Path, digests: np.ndarray) -> np.ndarray:
    """Split codes of ``digests`` as the manifest at ``path`` records them; examples it does not list are
    :data:`LEFT_OUT`. Raises :class:`DataSourceError` when the manifest lists examples the data no longer has."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"--data.splits {path} does not exist; pass the data_splits.csv a run wrote into its "
                         f"run directory, or drop --data.splits to split by content.")
    recorded: dict[bytes, int] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"digest", "split"} <= set(reader.fieldnames):
            raise DataSourceError(f"{path} is not a split manifest (it needs the columns digest and split, as the "
                             f"data_splits.csv a run writes).")
        for row in reader:
            if row["split"] not in SPLIT_CODE:
                raise DataSourceError(f"{path}: split {row['split']!r} of {row.get('name')} is not one of "
                                 f"{', '.join(SPLIT_NAMES)}.")
            recorded[bytes.fromhex(row["digest"])] = SPLIT_CODE[row["split"]]
    keys = [d.tobytes() for d in digests]
    missing = len(set(recorded) - set(keys))
    if missing:
        raise DataSourceError(f"{missing} example(s) listed in {path} are not in the data any more (removed or "
                         f"changed); restore them, or drop --data.splits to split the current data by content.")
    return np.array([recorded.get(k, LEFT_OUT) for k in keys], dtype=np.int8)
