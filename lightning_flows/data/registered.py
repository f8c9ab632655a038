"""The registered datasets (toy densities, digits, MNIST, CIFAR-10...) as a source, for streaming them.

In memory they are loaded by :func:`lightning_flows.data.registry.load_dataset` directly; this source exposes
the same splits, in the same order, as a catalogue and rows, so :mod:`lightning_flows.data.streaming` can write
them into shards like any user data.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_flows.data.cache import DataSourceError
from lightning_flows.data.registry import TOY_SAMPLERS, load_dataset, registered_info
from lightning_flows.data.source import Catalogue, SourceOptions
from lightning_flows.data.splits import SPLIT_CODE, SPLIT_NAMES, digests_of_rows


class RegisteredSource:
    """A registered dataset's splits for the seed asked, as a catalogue (``splits_by_content`` is False: its
    splits are the registry's own)."""

    splits_by_content = False

    def __init__(self, dataset: str, options: SourceOptions):
        self.dataset, self.options = dataset, options
        self.info = registered_info(dataset)
        self._rows: tuple[int, torch.Tensor] | None = None  # (seed, every split's examples, concatenated)

    def identity(self) -> dict:
        return {"registered": self.dataset, "n_val": self.options.n_val}

    def preprocessing(self) -> dict:
        return {"shape": list(self.info.shape), "levels": self.info.levels}

    def catalogue(self, seed: int) -> Catalogue:
        if self.dataset in TOY_SAMPLERS:
            raise DataSourceError(f"'{self.dataset}' is a 2D toy density, generated in memory; --data.streaming is "
                                  f"for image data. Set --data.streaming false.")
        splits = load_dataset(self.dataset, seed, self.options.data_dir, self.options.download, self.options.n_val)
        parts = [getattr(splits, split) for split in SPLIT_NAMES]
        rows = torch.cat(parts)
        self._rows = (seed, rows)
        codes = np.concatenate([np.full(len(p), SPLIT_CODE[s], np.int8) for s, p in zip(SPLIT_NAMES, parts)])
        labels = (torch.cat([getattr(splits, f"{s}_labels") for s in SPLIT_NAMES]).numpy().astype(np.int64)
                  if splits.train_labels is not None else None)
        names = [f"{split}/{i}" for split, part in zip(SPLIT_NAMES, parts) for i in range(len(part))]
        return Catalogue(names, digests_of_rows(rows.numpy()), labels, codes, np.arange(len(rows)))

    def read(self, positions: np.ndarray) -> np.ndarray:
        if self._rows is None:
            raise RuntimeError("RegisteredSource.read before catalogue(seed)")
        return self._rows[1][torch.as_tensor(positions, dtype=torch.long)].numpy()
