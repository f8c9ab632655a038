"""Data beyond memory: a source converted once into litdata shards, and training batches streamed from them.

**Shards.** :func:`ensure_shards` writes every split of a source (preprocessed uint8 examples and labels) into
``<cache>/data/shards/<name>-<key>/{train,val,test}/`` with litdata's ``BinaryWriter``, in the catalogue's serving
order (user data: by content digest, so every chunk is a random sample of the folder, not one class). The key
hashes every example's content digest, its split and the preprocessing, so a second run, another seed with the
same splits, or every rank of a DDP job reuses the shards, and changed data gets new ones. The shards are built
once under a file lock into a temporary directory and renamed into place (:func:`lightning_flows.data.cache.
build_once`): concurrent first runs never see or leave half a cache. Chunks hold a fixed number of examples
(about :data:`CHUNK_BYTES`; fewer, so that there are :data:`MIN_CHUNKS`, for a small split), so the shards,
and with them the data order, are the same on every machine.

**Streaming.** :class:`StreamedBatches` iterates litdata's ``StreamingDataLoader``: each rank and each loader
worker reads its own chunks (litdata's sharding; every rank gets the same number of batches), the chunk order
and the order inside chunks are reshuffled every epoch from the data seed, and only a few chunks per worker
are in memory at any time. Batches are dequantised in the training process with the per-epoch generator the
in-memory loader uses. ``state_dict`` / ``load_state_dict`` (stored by Lightning in every checkpoint) hold
litdata's own position plus the epoch and batch count, so a run killed mid-epoch continues with the same
batches and the same noise (the same ``num_workers`` and number of ranks are needed for that).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from lightning_flows.data.cache import DataSourceError, build_once, content_key, data_cache_dir, slug
from lightning_flows.data.loader import epoch_generator
from lightning_flows.data.source import READ_BLOCK, Catalogue
from lightning_flows.data.splits import SPLIT_NAMES
from lightning_flows.metrics.distributed import rank_and_world

CHUNK_BYTES = 4 << 20  # ~4 MiB of examples per chunk file
# ...and at least this many chunks per split: litdata deals whole chunks to the ranks (and workers), reshuffled
# every epoch, so a small split in one chunk would give every rank the same half of it in every epoch.
MIN_CHUNKS = 64
SHARD_FORMAT = 1  # bump when the shard layout changes
NO_LABEL = -1


def _litdata():
    try:
        import litdata
    except ImportError:
        raise DataSourceError("--data.streaming true needs litdata: pip install 'lightning-flows[streaming]' "
                              "(or pip install litdata).") from None
    return litdata


def shard_key(source, catalogue: Catalogue) -> str:
    """Hash of every example's content digest and split and of the preprocessing: names the shards."""
    arrays = (catalogue.digests, catalogue.codes, catalogue.order, catalogue.labels)
    return content_key({"source": type(source).__name__, "preprocessing": source.preprocessing(),
                        "catalogue": [None if a is None else hashlib.sha256(a.tobytes()).hexdigest() for a in arrays],
                        "format": SHARD_FORMAT, "chunk_bytes": CHUNK_BYTES, "min_chunks": MIN_CHUNKS})


def _write_split(source, catalogue: Catalogue, split: str, directory: Path) -> int:
    from litdata.streaming.writer import BinaryWriter

    _litdata()
    positions = catalogue.positions(split)
    if len(positions) == 0:  # e.g. --data.val_fraction 0: no shards (litdata writes no index for no items)
        return 0
    example_bytes = int(np.prod(source.info.shape))
    per_chunk = max(1, min(CHUNK_BYTES // example_bytes, -(-len(positions) // MIN_CHUNKS)))
    writer = BinaryWriter(str(directory), chunk_size=per_chunk)
    for start in range(0, len(positions), READ_BLOCK):
        block = positions[start:start + READ_BLOCK]
        examples = source.read(block)
        labels = catalogue.labels[block] if catalogue.labels is not None else np.full(len(block), NO_LABEL)
        for offset, (image, label) in enumerate(zip(examples, labels)):
            writer[start + offset] = {"image": np.ascontiguousarray(image), "label": int(label)}
    writer.done()
    # A single writer leaves its index as "<rank>.index.json" (its rank under DDP); it is the whole index.
    (written,) = glob.glob(str(directory / "*.index.json"))
    os.replace(written, directory / "index.json")
    return len(positions)


def ensure_shards(source, catalogue: Catalogue, cache_dir: str | None) -> Path:
    """The shard directory of ``source``'s splits in ``catalogue``, built now if no run built it before."""
    _litdata()
    root = data_cache_dir(cache_dir) / "shards" / f"{slug(source.dataset)}-{shard_key(source, catalogue)}"

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        counts = {split: _write_split(source, catalogue, split, tmp / split) for split in SPLIT_NAMES}
        meta = {"dataset": str(source.dataset), "counts": counts, "shape": list(source.info.shape),
                "labelled": catalogue.labels is not None, "preprocessing": source.preprocessing(),
                "split_digests": {split: catalogue.split_digest(split) for split in SPLIT_NAMES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    return build_once(root, build)


def read_shard_examples(directory: Path, positions: np.ndarray, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The examples at (sorted) ``positions`` of one split's shards (examples of ``shape``), the same on every rank:
    ``(n, C, H, W)``
    uint8 and their labels ``(n,)`` int64 (``-1``: unlabelled). (An integer index is global in litdata, while
    the dataset's ``len`` under DDP is one rank's share.)"""
    if len(positions) == 0:
        return torch.zeros(0, *shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    litdata = _litdata()
    dataset = litdata.StreamingDataset(str(directory), shuffle=False)
    items = [dataset[int(i)] for i in positions]
    images = torch.from_numpy(np.stack([np.asarray(item["image"]) for item in items]))
    return images, torch.tensor([int(item["label"]) for item in items], dtype=torch.int64)


class StreamedBatches:
    """Training batches from one split's shards: ``transform(raw_batch, None, generator)`` of each streamed
    uint8 batch, with its labels when ``labels``. See the module docstring for sharding, shuffling and resume.

    Args:
        directory: the split's shard directory (from :func:`ensure_shards`).
        batch_size: examples per batch on each rank (incomplete batches are dropped).
        transform: ``(raw_batch, indices, generator) -> batch`` as for the in-memory loader (indices: None).
        seed: the data seed: the shuffle of every epoch and the per-epoch noise generators derive from it.
        num_workers: loader worker processes reading chunks ahead of the training step (0: in this process).
        labels: serve ``(x, y)`` batches.
    """

    def __init__(self, directory: Path, batch_size: int, transform: Callable[[Tensor, Tensor | None, torch.Generator],
                 Tensor], seed: int, num_workers: int = 0, labels: bool = False):
        litdata = _litdata()
        self.dataset = litdata.StreamingDataset(str(directory), shuffle=True, drop_last=True, seed=seed)
        self.loader = litdata.StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers)
        self.batch_size, self.transform, self.seed, self.labels = batch_size, transform, seed, labels
        self.example_shape = tuple(np.asarray(self.dataset[0]["image"]).shape)
        self.epoch = 0
        self.position = 0
        self._resume_at: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": max(self.epoch - 1, 0), "position": self.position, "stream": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= len(self):  # saved at the very end of an epoch: the next iteration starts the next one
            self.loader.current_epoch = state["stream"]["current_epoch"]
            self.epoch, self._resume_at = epoch + 1, None
            return
        self.loader.load_state_dict(state["stream"])
        self._resume_at = (epoch, position)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        rank, _ = rank_and_world()
        epoch, skip = self.epoch, 0
        if self._resume_at is not None:
            epoch, skip = self._resume_at
            self._resume_at = None
        else:
            # litdata keeps replaying a restored epoch until one runs to its end; Lightning stops a resumed epoch
            # after its remaining batches without asking for the end, so the next epoch must start afresh here.
            self.loader.restore = False
        generator = epoch_generator(self.seed, epoch, rank)
        placeholder = torch.zeros(self.batch_size, *self.example_shape, dtype=torch.uint8)
        for _ in range(skip):  # the noise of the batches trained before the stop: draw it again, discard it
            self.transform(placeholder, None, generator)
        self.epoch, self.position = epoch + 1, skip
        for batch in self.loader:
            self.position += 1
            x = self.transform(batch["image"], None, generator)
            yield (x, batch["label"].long()) if self.labels else x
