"""The source layer beneath the DataModule: every dataset, whatever it comes from, as the same three things.

* ``info``: the facts a model is built from (example shape, levels, classes), known at construction without
  decoding the data (a folder's are read from its image headers, an array file's from its header);
* ``catalogue(seed)``: one entry per example (name, content digest, label, split), in the order it is served;
* ``read(positions)``: those examples as ``(n, C, H, W)`` uint8 arrays, preprocessed.

From these, :func:`load_splits` builds the in-memory splits and :mod:`lightning_flows.data.streaming` writes the
streaming shards, so a new source (one module in ``data/``, listed in :data:`lightning_flows.data.registry.SOURCES`)
is accepted by every family, the evaluator and the benchmark at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from lightning_flows.data.cache import DataSourceError, build_once, content_key, data_cache_dir, slug
from lightning_flows.data.registry import DatasetInfo, DatasetSplits
from lightning_flows.data.splits import LEFT_OUT, SPLIT_CODE, SPLIT_NAMES, assign_splits, splits_from_manifest

READ_BLOCK = 2048  # examples decoded at a time: bounds the memory of a pass over a large source


@dataclass(frozen=True)
class SourceOptions:
    """The DataModule's arguments a source reads (see :class:`lightning_flows.data.GenerativeDataModule`)."""

    image_size: int | None = None
    channels: int | None = None
    data_dir: str = "data"
    download: bool = False
    n_val: int = 5_000
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    splits: str | None = None
    cache_dir: str | None = None


@dataclass
class Catalogue:
    """One entry per example of a source: ``names`` (N,), ``digests`` (N, 16) uint8 of the raw content, ``labels``
    (N,) int64 or None, split ``codes`` (N,) int8 (0 train, 1 val, 2 test, -1 left out) and the serving ``order``
    (a permutation of 0..N-1: user data by digest, so shards mix every class and folder)."""

    names: list[str]
    digests: np.ndarray
    labels: np.ndarray | None
    codes: np.ndarray
    order: np.ndarray
    class_names: list[str] | None = None

    def positions(self, split: str) -> np.ndarray:
        """Positions of ``split``'s examples in serving order."""
        return self.order[self.codes[self.order] == SPLIT_CODE[split]]

    def split_digest(self, split: str) -> str:
        """16 hex digits of the content of ``split`` (its examples' digests in serving order)."""
        return content_key({"split": split, "digests": self.digests[self.positions(split)].tobytes().hex()})


def digest_order(digests: np.ndarray) -> np.ndarray:
    """The permutation sorting ``(N, 16)`` uint8 digests (lexicographically by their first two 64-bit words)."""
    words = np.ascontiguousarray(digests).view(">u8")
    return np.lexsort((words[:, 1], words[:, 0]))


@dataclass
class Index:
    """What a user source learns in one pass over its raw files, cached by their identity: every example's name,
    digest and label, plus ``facts`` for its :class:`DatasetInfo` (e.g. the image sizes found)."""

    names: list[str]
    digests: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    facts: dict = field(default_factory=dict)


class ImageSource:
    """Base of the sources of user and downloaded images (a folder, an array file, a named dataset).

    Subclasses set ``info`` in ``__init__`` and implement :meth:`identity`, :meth:`build_index` and :meth:`read`;
    the split rule is :mod:`lightning_flows.data.splits` (by content, or a saved manifest) unless overridden.
    """

    info: DatasetInfo
    # Whether the data's splits follow splits.py's content rule (user data) and a run writes their manifest.
    splits_by_content = True

    def __init__(self, dataset: str, options: SourceOptions):
        self.dataset, self.options = dataset, options
        self._index: Index | None = None

    # ---- what subclasses provide ----
    def identity(self) -> dict:
        """What defines the raw examples (file names, sizes, modification times...): the index cache's key."""
        raise NotImplementedError

    def build_index(self) -> Index:
        raise NotImplementedError

    def read(self, positions: np.ndarray) -> np.ndarray:
        """Examples at ``positions`` of the index -> ``(n, C, H, W)`` uint8, preprocessed to ``info.shape``."""
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """What turns raw examples into served ones (part of the streaming cache key)."""
        return {"shape": list(self.info.shape)}

    # ---- shared ----
    def index(self) -> Index:
        """The index, from the cache when the raw files are unchanged, else built (once, under a lock)."""
        if self._index is None:
            path = data_cache_dir(self.options.cache_dir) / "index" / (
                f"{slug(self.dataset)}-{content_key({'source': type(self).__name__, **self.identity()})}.npz")
            build_once(path, lambda tmp: _save_index(self.build_index(), tmp))
            self._index = _load_index(path)
        return self._index

    def split_codes(self, index: Index, seed: int) -> np.ndarray:
        if self.options.splits:
            return splits_from_manifest(self.options.splits, index.digests)
        return assign_splits(index.digests, seed, self.options.val_fraction, self.options.test_fraction)

    def catalogue(self, seed: int) -> Catalogue:
        index = self.index()
        return Catalogue(index.names, index.digests, index.labels, self.split_codes(index, seed),
                         digest_order(index.digests), index.class_names)

    def with_options(self, **changes) -> "ImageSource":
        return type(self)(self.dataset, replace(self.options, **changes))


def _save_index(index: Index, path: Path) -> None:
    arrays = {"names": np.array(index.names, dtype=str), "digests": index.digests}
    if index.labels is not None:
        arrays["labels"] = index.labels
    if index.class_names is not None:
        arrays["class_names"] = np.array(index.class_names, dtype=str)
    arrays.update({f"fact_{k}": np.asarray(v) for k, v in index.facts.items()})
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
        np.savez(f, **arrays)


def _load_index(path: Path) -> Index:
    with np.load(path, allow_pickle=False) as f:
        return Index(names=f["names"].tolist(), digests=f["digests"],
                     labels=f["labels"] if "labels" in f.files else None,
                     class_names=f["class_names"].tolist() if "class_names" in f.files else None,
                     facts={k[len("fact_"):]: f[k] for k in f.files if k.startswith("fact_")})


def read_split(source, catalogue: Catalogue, split: str, positions: np.ndarray | None = None) -> torch.Tensor:
    """The examples of ``split`` (or those at ``positions``) as one ``(n, C, H, W)`` uint8 tensor, read in blocks."""
    positions = catalogue.positions(split) if positions is None else positions
    out = np.empty((len(positions), *source.info.shape), dtype=np.uint8)
    for start in range(0, len(positions), READ_BLOCK):
        out[start:start + READ_BLOCK] = source.read(positions[start:start + READ_BLOCK])
    return torch.from_numpy(out)


def split_labels(catalogue: Catalogue, positions: np.ndarray) -> torch.Tensor | None:
    return None if catalogue.labels is None else torch.from_numpy(catalogue.labels[positions].astype(np.int64))


def check_splits_not_empty(dataset: str, catalogue: Catalogue) -> None:
    counts = {name: int((catalogue.codes == code).sum()) for code, name in enumerate(SPLIT_NAMES)}
    empty = [name for name, count in counts.items() if count == 0 and name != "val"]
    if empty:
        left_out = int((catalogue.codes == LEFT_OUT).sum())
        raise DataSourceError(
            f"'{dataset}' has no {' and no '.join(empty)} examples (splits {counts}"
            f"{f', {left_out} left out by --data.splits' if left_out else ''}): add images, or raise "
            f"--data.test_fraction / lower --data.val_fraction.")


def load_splits(source, seed: int) -> DatasetSplits:
    """Every split of ``source`` in memory: uint8 ``(N, C, H, W)`` tensors and their labels."""
    catalogue = source.catalogue(seed)
    check_splits_not_empty(source.dataset, catalogue)
    parts = {}
    for split in SPLIT_NAMES:
        positions = catalogue.positions(split)
        parts[split] = read_split(source, catalogue, split, positions)
        parts[f"{split}_labels"] = split_labels(catalogue, positions)
    return DatasetSplits(**parts, info=source.info)
