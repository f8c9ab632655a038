"""Real-data features for sample quality: the extractor, the reference split's features and the cache.

Features of a real split depend on the split's contents and the extractor's weights only, so they
are computed once and cached under ``<cache_dir>/reference_features/``. The file name carries a hash
of everything that defines them (dataset, split, the split's raw contents -- which covers the data
seed and ``n_val`` --, the extractor's name and weight fingerprint, and :data:`CACHE_VERSION`), and the
file repeats that key inside: a file whose key or row count does not match is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_flows.metrics.distributed import all_ranks_agree, barrier, gather_objects
from lightning_flows.metrics.features import build_feature_extractor

CACHE_VERSION = 2  # bump when the way features are computed changes


def real_pixels(datamodule, split: str) -> Tensor:
    """Split ``split`` of an image DataModule as pixels in [0, 1]: ``(N, C, H, W)``, level / (levels - 1),
    exactly the grid ``dm.to_pixels`` puts generated samples on."""
    datamodule.setup()
    if not datamodule.is_discrete or len(datamodule.data_shape) != 3:
        raise ValueError(f"FID needs an image dataset; '{datamodule.dataset}' has examples of shape "
                         f"{datamodule.data_shape}. Use energy distance and precision/recall for 2D data.")
    return getattr(datamodule.splits, split).float() / (datamodule.levels - 1)


def split_fingerprint(datamodule, split: str) -> str:
    """A hash of the raw contents of ``split`` (so the data seed and split sizes are part of it)."""
    datamodule.setup()
    raw = getattr(datamodule.splits, split)
    digest = hashlib.sha256(f"{datamodule.dataset}|{split}|{tuple(raw.shape)}|{raw.dtype}".encode())
    digest.update(raw.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_extractor(name: str, dataset: str, weights_path: str | None, cache_dir: Path, rank: int,
                    device: torch.device):
    """The feature extractor on every rank. Rank zero builds first (it may download Inception weights or
    train and cache the classifier); the others then load what it wrote instead of racing to write it."""
    build = lambda: build_feature_extractor(name, dataset, weights_path, cache_dir)  # noqa: E731
    extractor = build() if rank == 0 else None
    barrier(device)
    return (extractor if rank == 0 else build()).to(device)


def extract_features(extractor, pixels: Tensor, batch_size: int, device: torch.device, progress=None) -> Tensor:
    """``pixels: (N, C, H, W)`` in [0, 1] -> ``(N, F)`` float32 features on the CPU, ``batch_size`` images
    at a time on ``device``, under inference mode. ``progress``: an optional tqdm bar advanced by the examples
    done."""
    if len(pixels) == 0:
        return torch.zeros(0, extractor.num_features)
    features = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            features.append(extractor(pixels[i:i + batch_size].to(device)).float().cpu())
            if progress is not None:
                progress.update(len(features[-1]))
    return torch.cat(features)


def content_fingerprint(name: str, data: Tensor) -> str:
    """A hash of ``name`` and the contents of ``data`` (any tensor of real data)."""
    digest = hashlib.sha256(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
    digest.update(data.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cache_path(cache_dir: Path, dataset: str, name: str, data_hash: str, extractor) -> Path:
    key = f"{dataset}_{name}_{extractor.name}-{extractor.fingerprint}_{data_hash}"
    return Path(cache_dir) / "reference_features" / f"{key}_v{CACHE_VERSION}.pt"


def reference_cache_path(cache_dir: Path, datamodule, split: str, extractor) -> Path:
    return _cache_path(cache_dir, datamodule.dataset, split, split_fingerprint(datamodule, split), extractor)


def _load_valid(path: Path, expected_rows: int) -> Tensor | None:
    """The cached features if the file is readable and its key and size match, else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        features = payload["features"]
        if payload.get("key") == path.stem and features.shape[0] == expected_rows:
            return features
        reason = f"key {payload.get('key')!r} / {features.shape[0]} rows, expected {path.stem!r} / {expected_rows}"
    except Exception as err:  # truncated or foreign file: recompute
        reason = f"{type(err).__name__}: {err}"
    warnings.warn(f"Ignoring stale or unreadable cached features {path} ({reason}); recomputing.", stacklevel=2)
    return None


def reference_features(extractor, datamodule, split: str, cache_dir: Path, rank: int, world: int,
                       device: torch.device, batch_size: int = 500, progress=None) -> Tensor:
    """Features of the whole real split ``split``: ``(N, F)`` float32, on every rank (a collective).

    ``progress``: optional ``total -> context manager yielding a tqdm bar``, used when the features are computed
    (not when they come from the cache); a split of 50,000 images through Inception takes a while.
    """
    return real_features(extractor, datamodule.dataset, split, real_pixels(datamodule, split),
                         reference_cache_path(cache_dir, datamodule, split, extractor), rank, world, device,
                         batch_size, progress)


def real_features(extractor, dataset: str, name: str, pixels: Tensor, path: Path, rank: int, world: int,
                  device: torch.device, batch_size: int = 500, progress=None) -> Tensor:
    """Features of the real images ``pixels: (N, C, H, W)`` (``name``: which set, e.g. a split), cached at
    ``path``: ``(N, F)`` float32 on every rank (a collective; each rank extracts every world-th image)."""
    cached = _load_valid(path, len(pixels))
    # Decide together: a rank that missed the cache while another hit it would reach other collectives.
    if all_ranks_agree(cached is not None, device):
        return cached
    mine = pixels[rank::world]
    if progress is None:
        local = extract_features(extractor, mine, batch_size, device)
    else:
        with progress(len(mine)) as bar:
            local = extract_features(extractor, mine, batch_size, device, progress=bar)
    features = torch.empty(len(pixels), local.shape[1])
    for r, part in enumerate(gather_objects(local)):
        features[r::world] = part
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"features": features, "key": path.stem, "dataset": dataset, "split": name,
                    "extractor": extractor.name}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return features


@dataclass(frozen=True)
class FloorSet:
    """The real images of the FID floor: ``name`` (a split, or ``classifier_holdout``), ``pixels: (N, C, H, W)``
    and ``labels: (N,)`` (None for unlabelled data)."""

    name: str
    pixels: Tensor
    labels: Tensor | None


# What a result's `floor_split` says when the floor is the built-in classifier's hold-out.
CLASSIFIER_HOLDOUT = "classifier_holdout"


def floor_set(datamodule, reference_split: str, builtin_classifier: bool) -> FloorSet:
    """The floor's real images: with the built-in feature classifier, the non-test images it was not trained on
    (:func:`lightning_flows.metrics.classifier.classifier_data`; the same for every data seed), so that, like the
    reference and the samples, the classifier never saw them; otherwise the split
    :func:`lightning_flows.evaluation.spec.floor_split_for` names (an extractor such as Inception saw none)."""
    from lightning_flows.evaluation.spec import floor_split_for
    from lightning_flows.metrics.classifier import classifier_data

    if builtin_classifier:
        pixels, labels = classifier_data(datamodule.dataset, datamodule.data_dir, datamodule.download).floor
        return FloorSet(CLASSIFIER_HOLDOUT, pixels, labels)
    split = floor_split_for(reference_split)
    labels = getattr(datamodule.splits, f"{split}_labels", None)
    return FloorSet(split, real_pixels(datamodule, split), None if labels is None else labels.long())


def floor_features(extractor, datamodule, floor: FloorSet, cache_dir: Path, rank: int, world: int,
                   device: torch.device, batch_size: int = 500, progress=None) -> Tensor:
    """Features of ``floor`` (cached like the reference's): ``(N, F)`` on every rank (a collective)."""
    path = _cache_path(cache_dir, datamodule.dataset, floor.name, content_fingerprint(floor.name, floor.pixels),
                       extractor)
    return real_features(extractor, datamodule.dataset, floor.name, floor.pixels, path, rank, world, device,
                         batch_size, progress)
