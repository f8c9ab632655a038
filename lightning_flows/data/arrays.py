"""An ``.npz`` array file as a dataset: ``--data.dataset PATH.npz``.

The file holds ``images``: uint8, ``(N, H, W)`` (grey), ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in {1, 3}, and
optionally ``labels``: ``(N,)`` non-negative integers (classes ``0..max``). The layout is read from the shape:
a last axis of 1 or 3 is channels-last, else a second axis of 1 or 3 is channels-first.

Only the headers are read to learn the facts, so a bad file fails before a run starts. The examples are read
row by row: an uncompressed member (``np.savez``) is memory-mapped, so a file larger than memory can be
streamed; a compressed one (``np.savez_compressed``) is decompressed into memory when first read.
``image_size`` / ``channels`` resize or convert every example through PIL (see :mod:`lightning_flows.data.images`).
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightning_flows.data import images
from lightning_flows.data.cache import DataSourceError
from lightning_flows.data.registry import DatasetInfo
from lightning_flows.data.source import READ_BLOCK, Index, ImageSource, SourceOptions
from lightning_flows.data.splits import digests_of_rows

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header (30 bytes)


@dataclass(frozen=True)
class Member:
    """One array of an ``.npz`` file, read without loading it: its shape and dtype, and where its data starts
    when it is stored uncompressed (None when compressed)."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int | None

    def array(self) -> np.ndarray:
        """The whole array: a read-only memory map when stored uncompressed, else decompressed into memory."""
        if self.offset is not None and not self.fortran_order and self.dtype != object:
            return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        with np.load(self.path, allow_pickle=False) as f:
            return f[self.key]


def npz_members(path: Path) -> dict[str, Member]:
    """Every array of the ``.npz`` at ``path``, from the zip directory and the ``.npy`` headers only."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataSourceError(f"{path} is not a readable .npz file ({err}); write it with numpy.savez(path, "
                              f"images=..., labels=...).") from None
    members = {}
    with archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                header_length = f.tell()
            offset = None
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
                offset = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10] + header_length
            key = info.filename[:-len(".npy")]
            members[key] = Member(path, key, tuple(shape), np.dtype(dtype), fortran, offset)
    return members


def image_layout(shape: tuple[int, ...], where: str) -> str:
    """``"NHW"``, ``"NHWC"`` or ``"NCHW"`` for an ``images`` array of ``shape`` (see the module docstring)."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4 and shape[3] in (1, 3):
        return "NHWC"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "NCHW"
    raise DataSourceError(f"{where}: images of shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                          f"with C = 1 or 3 channels (drop an alpha channel first).")


def to_nchw(rows: np.ndarray, layout: str) -> np.ndarray:
    if layout == "NHW":
        return rows[:, None]
    if layout == "NHWC":
        return rows.transpose(0, 3, 1, 2)
    return rows


def check_labels(labels: Member | None, count: int, where: str) -> np.ndarray | None:
    """The labels as int64 ``(N,)``, checked (integer, one per image, non-negative); None without labels."""
    if labels is None:
        return None
    if len(labels.shape) != 1 or labels.dtype.kind not in "iu":
        raise DataSourceError(f"{where}: labels must be a 1-D integer array (N,), got shape {labels.shape} and dtype "
                              f"{labels.dtype}; save class numbers 0..K-1, e.g. labels=np.asarray(y, np.int64).")
    if labels.shape[0] != count:
        raise DataSourceError(f"{where}: {labels.shape[0]} labels for {count} images; save exactly one label per "
                              f"image (or none, for unlabelled data).")
    values = np.asarray(labels.array(), dtype=np.int64)
    if count and values.min() < 0:
        raise DataSourceError(f"{where}: labels must be class numbers >= 0, found {int(values.min())}.")
    return values


class ArraySource(ImageSource):
    """Images (and labels) of one ``.npz`` file; see the module docstring."""

    def __init__(self, dataset: str, options: SourceOptions):
        super().__init__(dataset, options)
        self.path = Path(dataset).expanduser()
        if not self.path.is_file():
            raise DataSourceError(f"--data.dataset {self.path}: no such file. Pass an .npz file, a folder of images "
                                  f"or a dataset name.")
        members = npz_members(self.path)
        if "images" not in members:
            found = ", ".join(sorted(members)) or "none"
            raise DataSourceError(f"{self.path} has no 'images' array (it has: {found}); save it as "
                                  f"numpy.savez(path, images=uint8 array, labels=optional int array).")
        self.images = members["images"]
        if self.images.dtype != np.uint8:
            raise DataSourceError(f"{self.path}: images have dtype {self.images.dtype}, expected uint8 levels 0..255; "
                                  f"convert with (x * 255).round().clip(0, 255).astype(numpy.uint8) for floats in "
                                  f"[0, 1].")
        self.layout = image_layout(self.images.shape, str(self.path))
        self.labels = check_labels(members.get("labels"), self.images.shape[0], str(self.path))
        stored = to_nchw(np.empty((0, *self.images.shape[1:]), np.uint8), self.layout).shape[1:]
        self.stored_shape = tuple(int(s) for s in stored)
        self.info = derived_info(self.stored_shape, options, 0 if self.labels is None else int(self.labels.max()) + 1,
                                 str(self.path))

    def identity(self) -> dict:
        stat = os.stat(self.path)
        return {"file": self.path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def build_index(self) -> Index:
        rows = self.images.array()
        # Digests of the (C, H, W) pixels, so a channels-last and a channels-first file split alike.
        digests = np.concatenate([digests_of_rows(to_nchw(rows[i:i + READ_BLOCK], self.layout))
                                  for i in range(0, len(rows), READ_BLOCK)] or [np.empty((0, 16), np.uint8)])
        return Index([str(i) for i in range(len(rows))], digests, self.labels)

    def preprocessing(self) -> dict:
        return {"shape": list(self.info.shape), "resize": self.options.image_size, "channels": self.info.shape[0]}

    def read(self, positions: np.ndarray) -> np.ndarray:
        if self._array is None:
            self._array = self.images.array()
        rows = to_nchw(np.asarray(self._array[np.sort(positions)]), self.layout)
        rows = rows[np.argsort(np.argsort(positions))]  # sorted reads (a memory map's pages in order), given order
        return convert_examples(rows, self.info.shape, self.options.image_size)

    _array = None


def derived_info(stored_shape: tuple[int, int, int], options: SourceOptions, num_classes: int, where: str
                 ) -> DatasetInfo:
    """The served facts of stored ``(C, H, W)`` examples after ``options.channels`` / ``options.image_size``."""
    if options.channels not in (None, 1, 3):
        raise DataSourceError(f"--data.image_channels must be 1 or 3, got {options.channels}.")
    if options.image_size is not None and options.image_size < 1:
        raise DataSourceError(f"--data.image_size must be a positive number of pixels, got {options.image_size}.")
    channels = options.channels or stored_shape[0]
    size = (options.image_size,) * 2 if options.image_size else stored_shape[1:]
    return DatasetInfo(shape=(channels, *size), levels=256, num_classes=num_classes)


def convert_examples(rows: np.ndarray, shape: tuple[int, int, int], image_size: int | None) -> np.ndarray:
    """``(n, C, H, W)`` uint8 -> ``(n, *shape)``: unchanged when they match, else each through PIL (resize with
    the documented filter, channel conversion), so arrays and folders are preprocessed by the same code."""
    if tuple(rows.shape[1:]) == tuple(shape):
        return np.ascontiguousarray(rows)
    return np.stack([images.to_array(images.array_to_image(row), shape[0], image_size) for row in rows]) \
        if len(rows) else np.empty((0, *shape), np.uint8)
