"""One LightningDataModule for every generative family.

Data flow for discrete (image) data with ``L`` levels and ``D`` dimensions::

    k in {0..L-1}^D  --dequantise-->  y = (k + u) / L in [0, 1)^D  --affine-->  x = 2y - 1 in [-1, 1)^D

``x`` is the *model space* every family trains in. A model's density ``p(x)`` becomes a density on
the unit cube via ``log p(y) = log p(x) + preprocess_log_det`` (here ``D log 2``), and a lower bound
on the discrete likelihood via ``log P(k) >= log p(y) - D log L``; :func:`lightning_flows.metrics.bits_per_dim`
does that arithmetic in one place. A discrete model (categorical or discretised decoder) reports
``log P(k)`` as the piecewise-constant density of :mod:`lightning_flows.data.quantisation`, so the same
arithmetic gives it exactly ``-log2 P(k) / D``. Continuous (toy 2D) data is used as is: model space = data space.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor

from lightning_flows.data.loader import InMemoryBatches
from lightning_flows.data.quantisation import bin_index, dequantise, unit_cube_to_model_space_log_det
from lightning_flows.data.registry import (DATASET_INFO, TORCHVISION_DATASETS, DatasetSplits, dataset_info,
                                           load_dataset)
from lightning_flows.metrics.bits_per_dim import bits_per_dim


class GenerativeDataModule(L.LightningDataModule):
    """Serve ``dataset`` to any family, in model space.

    Args:
        dataset: one of ``moons, 8gaussians, checkerboard, circles, pinwheel, 2spirals, digits,
            mnist5k, mnist, fashion_mnist, cifar10``.
        batch_size: training examples per step and per device.
        eval_batch_size: validation/test batch size (defaults to ``batch_size``).
        data_dir: where the torchvision datasets live (or are downloaded to).
        download: allow torchvision to download missing files.
        seed: fixes the splits, the evaluation dequantisation noise and the batch order.
        n_val: validation examples held out of the torchvision training sets.
        conditional: serve ``(x, y)`` batches from every loader, ``y: (B,)`` int64 class labels, for
            class-conditional models (the CLI links :attr:`num_classes` into them); labelled datasets only.
    """

    def __init__(self, dataset: str = "digits", batch_size: int = 128, eval_batch_size: int | None = None,
                 data_dir: str = "data", download: bool = False, seed: int = 0, n_val: int = 5_000,
                 conditional: bool = False):
        super().__init__()
        self.info = dataset_info(dataset)  # fails fast on an unknown name
        if conditional and self.info.num_classes == 0:
            labelled = ", ".join(name for name, info in DATASET_INFO.items() if info.num_classes)
            raise ValueError(f"data.conditional: true needs class labels, and '{dataset}' has none. Use a labelled "
                             f"dataset ({labelled}) or set data.conditional: false (and an unconditional model).")
        self.conditional = conditional
        self.save_hyperparameters()
        self.dataset = dataset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.data_dir, self.download, self.seed, self.n_val = data_dir, download, seed, n_val
        self.splits: DatasetSplits | None = None
        self._eval_noise: dict[str, Tensor] = {}

    # ---- static facts (available before setup, e.g. for LightningCLI argument links) ----
    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one example in model space, e.g. ``(2,)`` or ``(1, 8, 8)``."""
        return self.info.shape

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def levels(self) -> int | None:
        return self.info.levels

    @property
    def num_classes(self) -> int:
        """Classes of the labels the loaders serve: the dataset's class count when ``conditional``, else 0."""
        return self.info.num_classes if self.conditional else 0

    @property
    def is_discrete(self) -> bool:
        return self.info.levels is not None

    @property
    def preprocess_log_det(self) -> float:
        """log|det d(model space)/d(unit-cube data)| per example: ``D log 2`` for ``x = 2y - 1``."""
        return unit_cube_to_model_space_log_det(self.dim) if self.is_discrete else 0.0

    def bits_per_dim(self, nll_model_space: Tensor | float) -> Tensor | float:
        """Model-space NLL in nats per example -> bits per dimension of the original data."""
        return bits_per_dim(nll_model_space, dim=self.dim, levels=self.levels,
                            preprocess_log_det=self.preprocess_log_det)

    # ---- the maps between pixels and model space ----
    def dequantise(self, k: Tensor, noise: Tensor) -> Tensor:
        """Integer levels ``k`` and uniform ``noise`` in [0, 1) -> model space [-1, 1)."""
        return dequantise(k, noise, self.levels)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model space -> display intensities in [0, 1] (the quantisation level, rescaled)."""
        if not self.is_discrete:
            return x
        return bin_index(x, self.levels).to(x.dtype) / (self.levels - 1)

    def true_log_density(self, x: Tensor) -> Tensor | None:
        """Exact log p_data(x) where the dataset defines one (8gaussians, checkerboard), else None."""
        self.setup()
        return None if self.splits.log_density is None else self.splits.log_density(x)

    # ---- Lightning hooks ----
    def prepare_data(self) -> None:
        # Runs on one process per node: the only place a download may happen.
        if self.dataset in TORCHVISION_DATASETS:
            load_dataset(self.dataset, self.seed, self.data_dir, self.download, self.n_val)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = load_dataset(self.dataset, self.seed, self.data_dir, self.download, self.n_val)
        if self.is_discrete:
            # Fixed dequantisation noise for evaluation: the same test NLL on every run and any
            # number of ranks, since each example carries its own noise.
            for offset, split in enumerate(("val", "test")):
                data = getattr(self.splits, split)
                gen = torch.Generator().manual_seed(self.seed * 1000 + 17 + offset)
                self._eval_noise[split] = torch.rand(data.shape, generator=gen)

    def split(self, name: str) -> Tensor:
        """The whole split ``name`` in model space (evaluation dequantisation for discrete data)."""
        self.setup()
        data = getattr(self.splits, name)
        if not self.is_discrete:
            return data
        if name == "train":
            gen = torch.Generator().manual_seed(self.seed)
            return self.dequantise(data, torch.rand(data.shape, generator=gen))
        return self.dequantise(data, self._eval_noise[name])

    def split_labels(self, name: str) -> Tensor:
        """The class labels ``(N,)`` int64 of split ``name``, in the order of :meth:`split`."""
        self.setup()
        labels = getattr(self.splits, f"{name}_labels")
        if labels is None:
            raise ValueError(f"'{self.dataset}' has no class labels; labelled datasets: "
                             f"{', '.join(n for n, info in DATASET_INFO.items() if info.num_classes)}.")
        return labels.long()

    def _labels_served(self, name: str) -> Tensor | None:
        return self.split_labels(name) if self.conditional else None

    def _train_transform(self, raw: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
        if not self.is_discrete:
            return raw
        return self.dequantise(raw, torch.rand(raw.shape, generator=gen))

    def _eval_transform(self, split: str):
        def transform(raw: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
            return raw if not self.is_discrete else self.dequantise(raw, self._eval_noise[split][idx])
        return transform

    def train_dataloader(self) -> InMemoryBatches:
        self.setup()
        if len(self.splits.train) < self.batch_size:
            raise ValueError(f"batch_size={self.batch_size} exceeds the {len(self.splits.train)} training "
                             f"examples of '{self.dataset}'; lower --data.batch_size.")
        loader = InMemoryBatches(self.splits.train, self.batch_size, self._train_transform,
                                 shuffle=True, drop_last=True, seed=self.seed, labels=self._labels_served("train"))
        # A model may add a stage after the loader (flow matching pairs noise with data there, ahead of the step).
        stage = getattr(self.trainer.lightning_module if self.trainer else None, "train_batch_stage", None)
        return loader if stage is None else stage(loader, self.seed)

    def _eval_loader(self, split: str) -> InMemoryBatches:
        self.setup()
        return InMemoryBatches(getattr(self.splits, split), self.eval_batch_size, self._eval_transform(split),
                               shuffle=False, drop_last=False, seed=self.seed, labels=self._labels_served(split))

    def val_dataloader(self) -> InMemoryBatches:
        return self._eval_loader("val")

    def test_dataloader(self) -> InMemoryBatches:
        return self._eval_loader("test")
