"""FID on torchmetrics' ``FrechetInceptionDistance`` with our feature extractors, plus cached
real-data statistics.

torchmetrics keeps FID as float64 *sums* (``sum f``, ``sum f f^T``, count) for the real and the
generated set and all-reduces them across DDP ranks in ``compute()``; a sum is exact to rounding
whichever rank added which sample, so the DDP value equals the single-process one. The real-set
sums depend only on (dataset, data seed, split, extractor weights): they are computed once, stored
under the cache dir and injected into the metric on rank zero only (the other ranks hold zeros),
so the all-reduce reproduces them exactly once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_flows.metrics.distributed import sum_across_ranks


@dataclass
class FeatureStatistics:
    """Sufficient statistics of a feature set: ``total = sum f`` (F,), ``outer = sum f f^T`` (F, F),
    ``count`` (float64, on the CPU)."""

    total: Tensor
    outer: Tensor
    count: int

    @classmethod
    def zeros(cls, num_features: int) -> "FeatureStatistics":
        return cls(torch.zeros(num_features, dtype=torch.float64),
                   torch.zeros(num_features, num_features, dtype=torch.float64), 0)

    def add_features(self, features: Tensor) -> None:
        """``features: (B, F)``; the same float64 accumulation as torchmetrics' ``update``."""
        features = features.detach().double().cpu()
        self.total += features.sum(0)
        self.outer += features.t().mm(features)
        self.count += features.shape[0]

    def reduced(self, device: torch.device | str = "cpu") -> "FeatureStatistics":
        """Sum over DDP ranks (a collective: every rank must call it)."""
        count = sum_across_ranks(torch.tensor([float(self.count)], dtype=torch.float64), device)
        return FeatureStatistics(sum_across_ranks(self.total, device), sum_across_ranks(self.outer, device),
                                 int(round(count.item())))

    def save(self, path: Path, **metadata) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"total": self.total, "outer": self.outer, "count": self.count, **metadata}, tmp)
        os.replace(tmp, path)  # atomic, so a concurrent reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> "FeatureStatistics":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls(payload["total"], payload["outer"], int(payload["count"]))


def feature_statistics(extractor, pixels: Tensor, batch_size: int = 500,
                       device: torch.device | str = "cpu") -> FeatureStatistics:
    """Statistics of ``extractor`` features of ``pixels: (N, C, H, W)`` in [0, 1] on this process."""
    stats = FeatureStatistics.zeros(extractor.num_features)
    for start in range(0, len(pixels), batch_size):
        stats.add_features(extractor(pixels[start:start + batch_size].to(device)))
    return stats


def make_fid_metric(extractor, sync_on_compute: bool = True) -> FrechetInceptionDistance:
    """torchmetrics FID on ``extractor`` (inputs: pixels in [0, 1]); real statistics survive ``reset()``.

    ``sync_on_compute=False`` computes from this process's states only (a local reference value).
    """
    return FrechetInceptionDistance(feature=extractor, reset_real_features=False, normalize=True,
                                    sync_on_compute=sync_on_compute)


def set_real_statistics(metric: FrechetInceptionDistance, stats: FeatureStatistics, owner: bool) -> None:
    """Load the full real-set ``stats`` into ``metric`` on the owning rank and zeros elsewhere, so
    torchmetrics' sum-reduction across ranks yields ``stats`` exactly once."""
    source = stats if owner else FeatureStatistics.zeros(stats.total.shape[0])
    device = metric.real_features_sum.device
    metric.real_features_sum = source.total.to(device)
    metric.real_features_cov_sum = source.outer.to(device)
    metric.real_features_num_samples = torch.tensor(source.count, dtype=torch.long, device=device)


def update_fake(metric: FrechetInceptionDistance, pixels: Tensor, batch_size: int = 500) -> None:
    """Add generated ``pixels: (N, C, H, W)`` in [0, 1]. Calls ``update`` at least once, even with
    ``N = 0``, so a rank without samples can still take part in ``compute()``."""
    device = metric.real_features_sum.device
    starts = range(0, len(pixels), batch_size) if len(pixels) else [0]
    for start in starts:
        metric.update(pixels[start:start + batch_size].to(device), real=False)


# ---- cache of real statistics and of the train-vs-test floor ----

def real_pixels(datamodule, split: str) -> Tensor:
    """Split ``split`` of an image DataModule as pixels in [0, 1]: ``(N, C, H, W)``, level / (levels - 1),
    exactly the grid ``dm.to_pixels`` puts generated samples on."""
    datamodule.setup()
    if not datamodule.is_discrete or len(datamodule.data_shape) != 3:
        raise ValueError(f"FID needs an image dataset; '{datamodule.dataset}' has examples of shape "
                         f"{datamodule.data_shape}. Use the sampling-cost callback (and energy distance) for "
                         f"2D data.")
    return getattr(datamodule.splits, split).float() / (datamodule.levels - 1)


def statistics_cache_path(cache_dir: Path, dataset: str, data_seed: int, split: str, extractor) -> Path:
    name = f"{dataset}_seed{data_seed}_{split}_{extractor.name}-{extractor.fingerprint}.pt"
    return Path(cache_dir) / "fid_stats" / name


def floor_cache_path(cache_dir: Path, dataset: str, data_seed: int, real_split: str, floor_split: str, n: int,
                     extractor) -> Path:
    return (Path(cache_dir) / "fid_stats" /
            f"{dataset}_seed{data_seed}_floor_{floor_split}_vs_{real_split}_n{n}_{extractor.name}-{extractor.fingerprint}.json")


def save_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
