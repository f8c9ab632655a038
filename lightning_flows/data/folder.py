"""A directory of image files as a dataset: ``--data.dataset PATH/``.

Layout: images directly in ``PATH`` are one unlabelled set; images in subfolders of ``PATH`` (at any depth
below them) are labelled by their top subfolder, classes numbered in sorted name order (``cat/`` 0, ``dog/`` 1).
Files with other suffixes and hidden files are skipped. Every image is served at one size and channel count:
``image_size`` (shorter side + centre crop, see :mod:`lightning_flows.data.images`) or, without it, the size all
images share (mixed sizes are an error naming ``--data.image_size``); ``channels`` or, without it, 1 when every
image is grey, else 3.

The index (every file's content digest, size and colour) is built in one pass over the files the first time a
folder is used and cached under the data cache, keyed by the files' names, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from lightning_flows.data import images
from lightning_flows.data.cache import DataSourceError
from lightning_flows.data.registry import DatasetInfo
from lightning_flows.data.source import Index, ImageSource, SourceOptions
from lightning_flows.data.splits import digest


def list_images(root: Path) -> tuple[list[str], list[str] | None]:
    """``(relative paths, class names or None)`` of the images under ``root``, sorted; raises a clear error for a
    missing, empty or mixed (top-level images beside class folders) directory."""
    if not root.exists():
        raise DataSourceError(f"--data.dataset {root}: no such file or directory. Pass a folder of images, an .npz "
                              f"file or a dataset name.")
    top_images, classes = [], {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found = sorted(str(Path(dirpath, name).relative_to(root))
                           for dirpath, dirnames, names in os.walk(entry.path, followlinks=True)
                           for name in names if not name.startswith(".") and images.is_image_file(name)
                           and not any(part.startswith(".") for part in Path(dirpath).relative_to(root).parts))
            if found:
                classes[entry.name] = found
        elif images.is_image_file(entry.name):
            top_images.append(entry.name)
    if top_images and classes:
        raise DataSourceError(f"{root} has images both at its top level ({top_images[0]}, ...) and in subfolders "
                              f"({', '.join(list(classes)[:3])}): put every image in a class subfolder (labelled) or "
                              f"all of them at the top level (unlabelled).")
    if not top_images and not classes:
        suffixes = ", ".join(images.IMAGE_SUFFIXES)
        raise DataSourceError(f"{root} holds no images (looked for {suffixes}, in the folder or in class "
                              f"subfolders); point --data.dataset at a folder of images.")
    if classes:
        return [path for names in classes.values() for path in names], list(classes)
    return top_images, None


class FolderSource(ImageSource):
    """Images under a directory; see the module docstring."""

    def __init__(self, dataset: str, options: SourceOptions):
        super().__init__(dataset, options)
        self.root = Path(dataset).expanduser()
        if options.channels not in (None, 1, 3):
            raise DataSourceError(f"--data.image_channels must be 1 or 3, got {options.channels}.")
        if options.image_size is not None and options.image_size < 1:
            raise DataSourceError(f"--data.image_size must be a positive number of pixels, got {options.image_size}.")
        self.files, self.class_names = list_images(self.root)
        index = self.index()
        self.channels = options.channels or (1 if bool(index.facts["grey"].all()) else 3)
        height, width = (options.image_size,) * 2 if options.image_size else self._common_shape(index)
        self.info = DatasetInfo(shape=(self.channels, height, width), levels=256,
                                num_classes=len(self.class_names or ()))

    def _common_shape(self, index: Index) -> tuple[int, int]:
        sizes = index.facts["sizes"]  # (N, 2): width, height
        distinct, first, counts = np.unique(sizes, axis=0, return_index=True, return_counts=True)
        if len(distinct) > 1:
            shown = ", ".join(f"{w}x{h} ({n} images, e.g. {self.files[i]})"
                              for (w, h), i, n in list(zip(distinct.tolist(), first, counts))[:3])
            raise DataSourceError(f"{self.root} has images of {len(distinct)} sizes: {shown}. Set --data.image_size N "
                                  f"to resize every image (shorter side to N, centre crop).")
        width, height = distinct[0].tolist()
        return height, width

    def identity(self) -> dict:
        return files_identity(self.root, self.files)

    def build_index(self) -> Index:
        labels = None
        if self.class_names is not None:
            number = {name: k for k, name in enumerate(self.class_names)}
            labels = np.array([number[Path(name).parts[0]] for name in self.files], np.int64)
        return index_files(self.root, self.files, labels, self.class_names)

    def preprocessing(self) -> dict:
        return {"shape": list(self.info.shape), "resize": self.options.image_size, "channels": self.channels,
                "filter": "box-halving+bicubic, centre crop"}

    def read(self, positions: np.ndarray) -> np.ndarray:
        return decode_files(self.root, [self.index().names[i] for i in positions], self.info.shape,
                            self.options.image_size)


def files_identity(root: Path, files: list[str]) -> dict:
    """The names, sizes and modification times of ``files`` under ``root``, hashed (an index's cache key)."""
    listing = hashlib.sha256()
    for name in files:
        stat = os.stat(root / name)
        listing.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": listing.hexdigest(), "count": len(files)}


def index_files(root: Path, files: list[str], labels: np.ndarray | None, class_names: list[str] | None) -> Index:
    """One pass over ``files``: each one's content digest and, from its header, size and colour."""
    digests = np.empty((len(files), 16), np.uint8)
    sizes = np.empty((len(files), 2), np.int64)
    grey = np.empty(len(files), bool)
    for i, name in enumerate(files):
        data = (root / name).read_bytes()
        digests[i] = np.frombuffer(digest(data), np.uint8)
        width, height, grey[i] = images.header(data, str(root / name))
        sizes[i] = width, height
    return Index(files, digests, labels, class_names, facts={"sizes": sizes, "grey": grey})


def decode_files(root: Path, names: list[str], shape: tuple[int, int, int], image_size: int | None,
                 crop: int | None = None) -> np.ndarray:
    """The images ``names`` under ``root`` -> ``(n, *shape)`` uint8 (see :func:`lightning_flows.data.images.decode`)."""
    out = np.empty((len(names), *shape), np.uint8)
    for i, name in enumerate(names):
        image = images.decode((root / name).read_bytes(), str(root / name), shape[0], image_size, crop)
        if image.shape != tuple(shape):  # an image whose size changed since the folder was indexed
            raise DataSourceError(f"{root / name} decoded to shape {image.shape}, expected {tuple(shape)}: the "
                                  f"folder changed while in use. Rerun, or set --data.image_size.")
        out[i] = image
    return out
