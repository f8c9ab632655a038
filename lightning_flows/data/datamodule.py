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

import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_flows.data.loader import InMemoryBatches
from lightning_flows.data.quantisation import bin_index, dequantise, unit_cube_to_model_space_log_det
from lightning_flows.data.registry import DATASET_INFO, TORCHVISION_DATASETS, DatasetSplits, load_dataset
from lightning_flows.data.resolve import is_registered, open_source
from lightning_flows.data.source import SourceOptions, check_splits_not_empty, load_splits
from lightning_flows.data.splits import check_fractions, write_manifest
from lightning_flows.metrics.bits_per_dim import bits_per_dim

SPLIT_MANIFEST = "data_splits.csv"  # written into the run directory for user data (folders, .npz files)


class GenerativeDataModule(L.LightningDataModule):
    """Serve ``dataset`` to any family, in model space.

    Args:
        dataset: a registered name (``moons, 8gaussians, checkerboard, circles, pinwheel, 2spirals, digits,
            mnist5k, mnist, fashion_mnist, cifar10``), a named download (``celeba64, imagenet32, imagenet64``,
            see :mod:`lightning_flows.data.named`), the path of a folder of images (class subfolders give labels,
            see :mod:`lightning_flows.data.folder`) or of an ``.npz`` file (``images`` and optional ``labels``,
            see :mod:`lightning_flows.data.arrays`).
        batch_size: training examples per step and per device.
        eval_batch_size: validation/test batch size (defaults to ``batch_size``).
        data_dir: where the torchvision datasets and named downloads live (or are downloaded to).
        download: allow downloading missing files (torchvision datasets, CelebA).
        seed: fixes the splits, the evaluation dequantisation noise and the batch order.
        n_val: validation examples held out of the torchvision and ImageNet training sets.
        conditional: serve ``(x, y)`` batches from every loader, ``y: (B,)`` int64 class labels, for
            class-conditional models (the CLI links :attr:`num_classes` into them); labelled datasets only.
        image_size: folders and ``.npz`` files: serve ``image_size x image_size`` images (shorter side scaled,
            centre crop; filter in :mod:`lightning_flows.data.images`). Default: the images' own (common) size.
        image_channels: folders and ``.npz`` files: 1 (grey) or 3 (colour). Default: the data's own. (Not
            ``channels``: Lightning merges the DataModule's hyperparameters with the model's, and the CNF has a
            ``channels`` of its own.)
        val_fraction, test_fraction: folders and ``.npz`` files: the expected share of the val and test splits,
            drawn from each example's content (:mod:`lightning_flows.data.splits`; test the same for every seed).
        splits: folders and ``.npz`` files: a split manifest (``data_splits.csv`` of an earlier run) whose
            examples and splits to use exactly (files added since are left out).
        streaming: convert the data once into litdata shards (cached) and stream the training split from them
            instead of holding it in memory (image data; see :mod:`lightning_flows.data.streaming`).
        num_workers: streaming: loader worker processes reading ahead of the training step.
        cache_dir: where folder indexes and streaming shards are cached (default ``$LIGHTNING_FLOWS_CACHE`` or
            ``~/.cache/lightning_flows``).
    """

    def __init__(self, dataset: str = "digits", batch_size: int = 128, eval_batch_size: int | None = None,
                 data_dir: str = "data", download: bool = False, seed: int = 0, n_val: int = 5_000,
                 conditional: bool = False, image_size: int | None = None, image_channels: int | None = None,
                 val_fraction: float = 0.05, test_fraction: float = 0.1, splits: str | None = None,
                 streaming: bool = False, num_workers: int = 0, cache_dir: str | None = None):
        super().__init__()
        check_fractions(val_fraction, test_fraction)
        self.source_options = SourceOptions(image_size=image_size, channels=image_channels, data_dir=data_dir,
                                            download=download, n_val=n_val, val_fraction=val_fraction,
                                            test_fraction=test_fraction, splits=splits, cache_dir=cache_dir)
        if is_registered(dataset) and any(v is not None for v in (image_size, image_channels, splits)):
            raise ValueError(f"'{dataset}' is a registered dataset with its own size and splits; --data.image_size, "
                             f"--data.image_channels and --data.splits apply to folders, .npz files and named "
                             f"downloads.")
        # Reads the facts (a folder's image headers, an array file's header) and fails fast on bad input.
        self.source = open_source(dataset, self.source_options)
        self.info = self.source.info
        if streaming and (len(self.info.shape) != 3 or self.info.levels is None):
            raise ValueError(f"--data.streaming true is for image datasets; '{dataset}' has examples of shape "
                             f"{self.info.shape}. Set --data.streaming false.")
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {num_workers}.")
        if conditional and self.info.num_classes == 0:
            labelled = ", ".join(name for name, info in DATASET_INFO.items() if info.num_classes)
            raise ValueError(f"data.conditional: true needs class labels, and '{dataset}' has none. Use a labelled "
                             f"dataset ({labelled}, imagenet32/64, a folder with one subfolder per class, an .npz "
                             f"with 'labels') or set data.conditional: false (and an unconditional model).")
        self.conditional = conditional
        self.save_hyperparameters()
        self.dataset = dataset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.data_dir, self.download, self.seed, self.n_val = data_dir, download, seed, n_val
        self.streaming, self.num_workers = streaming, num_workers
        self.splits: DatasetSplits | None = None
        self.shards = None  # the shard directory when streaming
        self._eval_noise: dict[str, Tensor] = {}
        self._manifest_written = False
        self._catalogue = None

    @property
    def catalogue(self):
        """Every example of the source with its content digest and split (see :mod:`lightning_flows.data.source`)."""
        if self._catalogue is None:
            self._catalogue = self.source.catalogue(self.seed)
        return self._catalogue

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
        # Runs on one process per node: the only place a download or the shard conversion starts (setup on the
        # other ranks then finds them; the cache's lock keeps a second job from building them twice).
        if hasattr(self.source, "prepare"):  # a named download (CelebA)
            self.source.prepare()
        if self.dataset in TORCHVISION_DATASETS and not self.streaming:
            load_dataset(self.dataset, self.seed, self.data_dir, self.download, self.n_val)
        elif self.streaming:
            self._shard_directory()

    def _shard_directory(self):
        from lightning_flows.data.streaming import ensure_shards

        if self.shards is None:
            check_splits_not_empty(self.dataset, self.catalogue)
            self.shards = ensure_shards(self.source, self.catalogue, self.source_options.cache_dir)
        return self.shards

    def setup(self, stage: str | None = None) -> None:
        if stage is not None and self.trainer is not None and not self._manifest_written:
            self._write_split_manifest()
        if self.splits is not None:
            return
        if self.streaming:
            self.splits = self._streamed_splits()
        elif is_registered(self.dataset):
            self.splits = load_dataset(self.dataset, self.seed, self.data_dir, self.download, self.n_val)
        else:
            self.splits = load_splits(self.source, self.seed)

    def _streamed_splits(self) -> DatasetSplits:
        """Val and test in memory (the evaluation's), and of the streamed training split an evenly spread subset
        as large as the test split (what the evaluation's real-vs-real floor and a train likelihood read)."""
        from lightning_flows.data.streaming import read_shard_examples

        directory = self._shard_directory()
        counts = json.loads((directory / "meta.json").read_text())["counts"]
        parts = {split: read_shard_examples(directory / split, np.arange(counts[split]), self.info.shape)
                 for split in ("val", "test")}
        subset = np.unique(np.linspace(0, counts["train"] - 1, min(counts["train"], max(counts["test"], 1))
                                       ).round().astype(np.int64))
        parts["train"] = read_shard_examples(directory / "train", subset, self.info.shape)
        labelled = self.info.num_classes > 0
        images = {split: examples for split, (examples, _) in parts.items()}
        labels = {f"{split}_labels": classes if labelled else None for split, (_, classes) in parts.items()}
        return DatasetSplits(**images, **labels, info=self.info)

    def _write_split_manifest(self) -> None:
        """User data: ``data_splits.csv`` (every example's name, content digest, split, label) in the run
        directory, the record that ``--data.splits`` takes to rerun on exactly these examples."""
        self._manifest_written = True
        if not getattr(self.source, "splits_by_content", False):
            return
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # every rank calls setup
        if self.trainer.is_global_zero:
            catalogue = self.catalogue
            write_manifest(directory / SPLIT_MANIFEST, catalogue.names, catalogue.digests, catalogue.codes,
                           catalogue.labels, catalogue.class_names)

    def state_dict(self) -> dict:
        """The content digest of the training split, so a resumed run can tell when the data changed."""
        if not getattr(self.source, "splits_by_content", False):
            return {}
        return {"train_digest": self.catalogue.split_digest("train")}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("train_digest")
        if saved and saved != self.state_dict().get("train_digest"):
            rank_zero_warn(f"The training examples of '{self.dataset}' differ from those this checkpoint was trained "
                           f"on (files added, removed or changed): the resumed data order is not the interrupted "
                           f"run's. Pass --data.splits <run dir>/{SPLIT_MANIFEST} to resume on the same examples.")

    def _evaluation_noise(self, split: str) -> Tensor:
        """Fixed dequantisation noise of ``split`` (val or test), made when evaluation first needs it (float32,
        4x the split's uint8 size: a training-only run never holds it): the same test NLL on every run and any
        number of ranks, since each example carries its own noise."""
        if split not in self._eval_noise:
            offset = ("val", "test").index(split)
            gen = torch.Generator().manual_seed(self.seed * 1000 + 17 + offset)
            self._eval_noise[split] = torch.rand(getattr(self.splits, split).shape, generator=gen)
        return self._eval_noise[split]

    def split(self, name: str) -> Tensor:
        """The whole split ``name`` in model space (evaluation dequantisation for discrete data)."""
        self.setup()
        data = getattr(self.splits, name)
        if not self.is_discrete:
            return data
        if name == "train":
            gen = torch.Generator().manual_seed(self.seed)
            return self.dequantise(data, torch.rand(data.shape, generator=gen))
        return self.dequantise(data, self._evaluation_noise(name))

    def split_labels(self, name: str) -> Tensor:
        """The class labels ``(N,)`` int64 of split ``name``, in the order of :meth:`split`."""
        self.setup()
        labels = getattr(self.splits, f"{name}_labels")
        if labels is None:
            raise ValueError(f"'{self.dataset}' has no class labels; labelled datasets: "
                             f"{', '.join(n for n, info in DATASET_INFO.items() if info.num_classes)}, imagenet32/64, "
                             f"a folder with class subfolders, an .npz with 'labels'.")
        return labels.long()

    def _labels_served(self, name: str) -> Tensor | None:
        return self.split_labels(name) if self.conditional else None

    def _train_transform(self, raw: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
        if not self.is_discrete:
            return raw
        return self.dequantise(raw, torch.rand(raw.shape, generator=gen))

    def _eval_transform(self, split: str):
        def transform(raw: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
            return raw if not self.is_discrete else self.dequantise(raw, self._evaluation_noise(split)[idx])
        return transform

    def train_dataloader(self) -> InMemoryBatches:
        self.setup()
        if self.streaming:
            from lightning_flows.data.streaming import StreamedBatches

            loader = StreamedBatches(self._shard_directory() / "train", self.batch_size, self._train_transform,
                                     self.seed, self.num_workers, labels=self.conditional)
            too_few = len(loader) == 0
        else:
            too_few = len(self.splits.train) < self.batch_size
        if too_few:
            raise ValueError(f"batch_size={self.batch_size} leaves no full batch of the training examples of "
                             f"'{self.dataset}' on each device; lower --data.batch_size.")
        if not self.streaming:
            loader = InMemoryBatches(self.splits.train, self.batch_size, self._train_transform, shuffle=True,
                                     drop_last=True, seed=self.seed, labels=self._labels_served("train"))
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
