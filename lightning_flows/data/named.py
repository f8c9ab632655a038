"""The field's standard likelihood and FID image benchmarks by name: ``celeba64``, ``imagenet32``, ``imagenet64``.

Each reads the dataset's official files under ``--data.data_dir`` and keeps its official split for the
evaluation reference (test), so numbers compare with the literature's:

* ``celeba64``: CelebA's aligned faces (``<data_dir>/celeba/img_align_celeba/*.jpg`` and
  ``list_eval_partition.txt``: train 162,770 / val 19,867 / test 19,962), the centre 148x148 square scaled to
  64x64 (the RealNVP / Glow preprocessing; filter as in :mod:`lightning_flows.data.images`), unlabelled.
  ``--data.download true`` fetches the files with torchvision's CelebA downloader (from Google Drive, which
  often refuses with a quota error: then download ``img_align_celeba.zip`` and ``list_eval_partition.txt`` by
  hand from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into ``<data_dir>/celeba/`` and unzip).
* ``imagenet32`` / ``imagenet64``: the downsampled ImageNet of Chrabaszcz et al. (2017), whose licence needs the
  user's own acceptance, so it is never downloaded automatically: sign in at https://image-net.org, accept the
  terms, download "Imagenet32_train_npz.zip" and "Imagenet32_val_npz.zip" (64x64: both train parts and the val
  file) and unzip them anywhere under ``<data_dir>/imagenet32/`` (``imagenet64/``). Each ``train_data_batch_*.npz``
  / ``val_data.npz`` holds ``data`` (N, 3*S*S) uint8 colour planes and ``labels`` 1..1000. The official 50,000
  validation images are the test split; ``n_val`` training images (seeded) are the validation split. Note:
  RealNVP and Glow report bits/dim on the earlier downsampled ImageNet of van den Oord et al. (2016), made with
  another resize; numbers on the two versions are close but not the same benchmark.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from lightning_flows.data.arrays import Member, npz_members
from lightning_flows.data.cache import DataSourceError
from lightning_flows.data.folder import decode_files, files_identity, index_files
from lightning_flows.data.registry import DatasetInfo
from lightning_flows.data.source import READ_BLOCK, Index, ImageSource, SourceOptions
from lightning_flows.data.splits import SPLIT_CODE, digests_of_rows

CELEBA_CROP = 148  # the centre square of the 178x218 aligned faces
CELEBA_SPLITS = {"0": "train", "1": "val", "2": "test"}  # list_eval_partition.txt's codes


def _fixed_size(name: str, options: SourceOptions, size: int) -> None:
    if options.image_size not in (None, size) or options.channels not in (None, 3):
        raise DataSourceError(f"{name} is {size}x{size} colour; drop --data.image_size / --data.image_channels, or "
                              f"pass the images as a folder (--data.dataset PATH --data.image_size N) for another "
                              f"size.")


class CelebA64(ImageSource):
    """CelebA aligned faces at 64x64; see the module docstring. The facts are fixed, so the files are first
    looked for when the data is prepared or read (a dry run needs none)."""

    def __init__(self, dataset: str, options: SourceOptions):
        super().__init__(dataset, options)
        _fixed_size(dataset, options, 64)
        self.root = Path(options.data_dir).expanduser() / "celeba"
        self.info = DatasetInfo(shape=(3, 64, 64), levels=256)
        self._listed: tuple[list[str], np.ndarray] | None = None

    def prepare(self) -> None:
        """Download with torchvision's CelebA downloader when allowed and the files are missing."""
        if self.options.download and not self._present():
            import torchvision

            torchvision.datasets.CelebA(str(self.root.parent), split="all", target_type=[], download=True)

    @property
    def files(self) -> list[str]:
        return self._partition()[0]

    def _partition(self) -> tuple[list[str], np.ndarray]:
        if self._listed is None:
            if not self._present():
                raise DataSourceError(
                    f"CelebA was not found under {self.root} (needs img_align_celeba/ and list_eval_partition.txt). "
                    f"Set --data.download true (torchvision's downloader), or download img_align_celeba.zip and "
                    f"list_eval_partition.txt from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into "
                    f"{self.root} and unzip; --data.data_dir sets where celeba/ is.")
            self._listed = self._read_partition()
        return self._listed

    def _present(self) -> bool:
        return (self.root / "img_align_celeba").is_dir() and (self.root / "list_eval_partition.txt").is_file()

    def _read_partition(self) -> tuple[list[str], np.ndarray]:
        files, codes = [], []
        for line in (self.root / "list_eval_partition.txt").read_text().split("\n"):
            if line.strip():
                name, code = line.split()
                files.append(f"img_align_celeba/{name}")
                codes.append(SPLIT_CODE[CELEBA_SPLITS[code]])
        missing = [f for f in files if not (self.root / f).is_file()]
        if missing:
            raise DataSourceError(f"{len(missing)} images listed in {self.root / 'list_eval_partition.txt'} are not "
                                  f"in {self.root / 'img_align_celeba'} (e.g. {missing[0]}); unzip "
                                  f"img_align_celeba.zip there completely.")
        return files, np.array(codes, np.int8)

    def identity(self) -> dict:
        return files_identity(self.root, self.files)

    def build_index(self) -> Index:
        return index_files(self.root, self.files, None, None)

    def split_codes(self, index: Index, seed: int) -> np.ndarray:
        return self._partition()[1]

    def preprocessing(self) -> dict:
        return {"shape": [3, 64, 64], "crop": CELEBA_CROP, "filter": "box-halving+bicubic"}

    def read(self, positions: np.ndarray) -> np.ndarray:
        return decode_files(self.root, [self.files[i] for i in positions], self.info.shape, 64, crop=CELEBA_CROP)


def _batch_number(path: Path) -> int:
    return int(re.search(r"(\d+)\.npz$", path.name).group(1))


class DownsampledImageNet(ImageSource):
    """Chrabaszcz et al.'s downsampled ImageNet at ``size`` x ``size``; see the module docstring."""

    size = 32

    def __init__(self, dataset: str, options: SourceOptions):
        super().__init__(dataset, options)
        _fixed_size(dataset, options, self.size)
        self.root = Path(options.data_dir).expanduser() / dataset
        self.info = DatasetInfo(shape=(3, self.size, self.size), levels=256, num_classes=1000)
        self._parts: list[tuple[Member, Member]] | None = None
        self._arrays: dict[int, np.ndarray] = {}

    @property
    def parts(self) -> list[tuple[Member, Member]]:
        """``(data, labels)`` of every train batch, then of the val file; found when first needed (a dry run
        builds the DataModule without the files)."""
        if self._parts is None:
            train = sorted(self.root.rglob("train_data_batch_*.npz"), key=_batch_number) if self.root.is_dir() else []
            val = sorted(self.root.rglob("val_data.npz")) if self.root.is_dir() else []
            if not train or len(val) != 1:
                raise DataSourceError(
                    f"{self.dataset} was not found under {self.root} (needs train_data_batch_*.npz and one "
                    f"val_data.npz). Its licence does not allow an automatic download: sign in at "
                    f"https://image-net.org, accept the terms, download the 'Downsampled ImageNet "
                    f"{self.size}x{self.size}' train and val npz zips and unzip them under {self.root} "
                    f"(--data.data_dir sets where {self.dataset}/ is).")
            self._parts = [self._member(path) for path in [*train, *val]]
        return self._parts

    @property
    def counts(self) -> np.ndarray:
        return np.array([data.shape[0] for data, _ in self.parts])

    def _member(self, path: Path) -> tuple[Member, Member]:
        members = npz_members(path)
        data, labels = members.get("data"), members.get("labels")
        width = 3 * self.size * self.size
        if data is None or labels is None or data.dtype != np.uint8 or data.shape[1:] != (width,) \
                or labels.shape != (data.shape[0],):
            raise DataSourceError(f"{path} is not a downsampled ImageNet {self.size}x{self.size} file (expected 'data' "
                                  f"uint8 (N, {width}) and 'labels' (N,)); download it again from image-net.org.")
        return data, labels

    def identity(self) -> dict:
        return {"files": [(p[0].path.name, p[0].path.stat().st_size, p[0].path.stat().st_mtime_ns)
                          for p in self.parts]}

    def build_index(self) -> Index:
        names, digests, labels = [], [], []
        for data, label in self.parts:
            rows = data.array()
            names += [f"{data.path.name}[{i}]" for i in range(len(rows))]
            digests += [digests_of_rows(rows[i:i + READ_BLOCK]) for i in range(0, len(rows), READ_BLOCK)]
            labels.append(np.asarray(label.array(), np.int64) - 1)  # 1..1000 -> 0..999
        return Index(names, np.concatenate(digests), np.concatenate(labels))

    def split_codes(self, index: Index, seed: int) -> np.ndarray:
        n_train = len(index.names) - int(self.counts[-1])
        codes = np.full(len(index.names), SPLIT_CODE["train"], np.int8)
        codes[n_train:] = SPLIT_CODE["test"]
        val = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:self.options.n_val].numpy()
        codes[val] = SPLIT_CODE["val"]
        return codes

    def preprocessing(self) -> dict:
        return {"shape": list(self.info.shape)}

    def read(self, positions: np.ndarray) -> np.ndarray:
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        part = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty((len(positions), *self.info.shape), np.uint8)
        for p in np.unique(part):
            if p not in self._arrays:
                self._arrays[p] = self.parts[p][0].array()
            chosen = part == p
            rows = positions[chosen] - starts[p]
            order = np.argsort(rows)
            block = np.asarray(self._arrays[p][rows[order]]).reshape(-1, *self.info.shape)
            out[np.flatnonzero(chosen)[order]] = block
        return out


class DownsampledImageNet64(DownsampledImageNet):
    size = 64


NAMED_SOURCES = {"celeba64": CelebA64, "imagenet32": DownsampledImageNet, "imagenet64": DownsampledImageNet64}
