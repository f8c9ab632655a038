"""FID of generated samples against a real split, DDP-correct, with its floor and sampling cost.

Logged at the end of every ``every_n_epochs``-th validation epoch and of testing, as::

    <stage>/fid_<extractor>_<split>_n<n>          model samples vs the real split
    <stage>/fid_floor_<extractor>_<split>_n<m>    real images of another split vs the same split
    <stage>/nfe_per_sample, <stage>/sec_per_sample

so the extractor, real split and sample count are part of every FID's name. The floor is FID
between two samples of the *data*, at (up to) the same n: a model cannot be expected to go below
it, and FIDs at small n are only meaningful relative to it.

Every rank runs every step (generation of its share, feature extraction, the all-reduce in
``compute()``); nothing here is rank-zero-only, which would hang DDP (torchmetrics #2684).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_flows.callbacks.sampling_cost import log_sampling_cost, should_evaluate
from lightning_flows.metrics.classifier import default_cache_dir
from lightning_flows.metrics.distributed import all_ranks_agree, barrier, rank_and_world
from lightning_flows.metrics.features import FEATURE_EXTRACTORS, build_feature_extractor
from lightning_flows.metrics.fid import (FeatureStatistics, feature_statistics, floor_cache_path, make_fid_metric,
                                         real_pixels, save_json, set_real_statistics, statistics_cache_path,
                                         update_fake)
from lightning_flows.metrics.generation import generate_rank_share
from lightning_flows.metrics.sampling_cost import SamplingCost

PUBLISHED_FID_SAMPLE_COUNTS = (10_000, 50_000)


def floor_split_for(real_split: str) -> str:
    """The split compared with ``real_split`` for the floor: train vs test (or vs val)."""
    return "test" if real_split == "train" else "train"


class FIDCallback(L.Callback):
    """FID of ``n`` samples against the real split ``real_split``.

    Args:
        n: generated samples per evaluation, split across ranks (``n / world`` each).
        feature_extractor: ``classifier`` (offline, small images; comparable only with itself) or
            ``inception`` (torch-fidelity Inception-v3, no antialiasing; comparable with published FID
            only at n = 10k or 50k against the same split).
        feature_extractor_weights_path: local weights (an Inception state dict, or a classifier file
            written by ``python -m lightning_flows.metrics.train_classifier``).
        real_split: ``train``, ``val`` or ``test`` of the DataModule (its seed fixes the split).
        every_n_epochs: evaluate every n-th validation epoch (0: only at test).
        chunk_size: samples per ``model.sample`` call; chunk i always uses seed (seed, i), so the
            samples are the same for any number of ranks.
        feature_batch_size: images per feature-extractor call.
        seed: sampling seed (the same noise every evaluation, so epochs are compared fairly).
        cache_dir: real statistics, floors and classifiers (default ``$LIGHTNING_FLOWS_CACHE`` or
            ``~/.cache/lightning_flows``).
        log_floor: also log the train-vs-test floor.
        log_sampling_cost: also log NFE and seconds per sample of the generated samples.
    """

    def __init__(self, n: int = 1000, feature_extractor: str = "classifier",
                 feature_extractor_weights_path: str | None = None, real_split: str = "test",
                 every_n_epochs: int = 1, chunk_size: int = 250, feature_batch_size: int = 500, seed: int = 0,
                 cache_dir: str | None = None, log_floor: bool = True, log_sampling_cost: bool = True):
        super().__init__()
        if feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(f"Unknown feature_extractor '{feature_extractor}'. Choose one of: "
                             f"{', '.join(FEATURE_EXTRACTORS)}.")
        if real_split not in ("train", "val", "test"):
            raise ValueError(f"real_split must be train, val or test, got '{real_split}'.")
        if n < 2:
            raise ValueError(f"FID needs at least 2 samples, got n={n}.")
        self.n, self.feature_extractor, self.weights_path = n, feature_extractor, feature_extractor_weights_path
        self.real_split, self.every_n_epochs, self.chunk_size = real_split, every_n_epochs, chunk_size
        self.feature_batch_size, self.seed = feature_batch_size, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.log_floor, self.log_sampling_cost = log_floor, log_sampling_cost
        self._extractor = None
        self._real_stats: FeatureStatistics | None = None
        self._floor: tuple[int, float] | None = None  # (sample count, FID)
        self.last_logged: dict[str, float] = {}
        self.last_rank_samples = 0  # samples this rank drew at the last evaluation

    # ---- hooks: all ranks ----
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if should_evaluate(trainer, self.every_n_epochs):
            self.evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module, "test")

    def metric_name(self, stage: str, n: int | None = None, floor: bool = False) -> str:
        kind = "fid_floor" if floor else "fid"
        return f"{stage}/{kind}_{self.feature_extractor}_{self.real_split}_n{self.n if n is None else n}"

    def evaluate(self, trainer: L.Trainer, pl_module, stage: str) -> dict[str, float]:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("FIDCallback needs the GenerativeDataModule: pass it as "
                               "trainer.fit(model, datamodule=dm).")
        device = pl_module.device
        rank, world = rank_and_world()
        self._prepare(datamodule, device, rank, world)

        metric = make_fid_metric(self._extractor).to(device)
        set_real_statistics(metric, self._real_stats, owner=rank == 0)
        cost = SamplingCost()
        samples = generate_rank_share(pl_module, self.n, self.chunk_size, self.seed, rank, world, cost)
        self.last_rank_samples = len(samples)
        update_fake(metric, datamodule.to_pixels(samples), self.feature_batch_size)
        logged = {self.metric_name(stage): float(metric.compute())}  # all-reduces the sums
        if self.log_floor:
            floor_n, floor_value = self._floor
            logged[self.metric_name(stage, floor_n, floor=True)] = floor_value
        for name, value in logged.items():
            pl_module.log(name, value, sync_dist=False)  # identical on every rank already
        if self.log_sampling_cost:
            logged.update(log_sampling_cost(pl_module, stage, cost.reduced(device)))
        self.last_logged = logged
        return logged

    # ---- one-off preparation: extractor, real statistics, floor (collective, cached) ----
    def _prepare(self, datamodule, device: torch.device, rank: int, world: int) -> None:
        if self._extractor is None:
            self._extractor = self._build_extractor(datamodule.dataset, device, rank)
            if self.feature_extractor == "inception" and self.n not in PUBLISHED_FID_SAMPLE_COUNTS and rank == 0:
                warnings.warn(f"Inception FID with n={self.n} is not comparable with published FIDs, which use "
                              f"10k or 50k samples; compare it only with runs at the same n and split.", stacklevel=2)
        self._extractor.to(device)
        if self._real_stats is None:
            self._real_stats = self._real_statistics(datamodule, device, rank, world)
        if self._floor is None and self.log_floor:
            self._floor = self._floor_value(datamodule, device, rank, world)

    def _build_extractor(self, dataset: str, device: torch.device, rank: int):
        # Rank zero first: it may download Inception weights or train and cache the classifier;
        # the others then load the file it wrote instead of racing to write it.
        build = lambda: build_feature_extractor(self.feature_extractor, dataset, self.weights_path,  # noqa: E731
                                                self.cache_dir)
        extractor = build() if rank == 0 else None
        barrier(device)
        return extractor if rank == 0 else build()

    def _real_statistics(self, datamodule, device, rank: int, world: int) -> FeatureStatistics:
        path = statistics_cache_path(self.cache_dir, datamodule.dataset, datamodule.seed, self.real_split,
                                     self._extractor)
        # Decide together: if one rank missed the cache and others did not, they would reach
        # different collectives and hang.
        if all_ranks_agree(path.exists(), device):
            return FeatureStatistics.load(path)
        pixels = real_pixels(datamodule, self.real_split)
        local = feature_statistics(self._extractor, pixels[rank::world], self.feature_batch_size, device)
        stats = local.reduced(device)
        if rank == 0:
            stats.save(path, dataset=datamodule.dataset, split=self.real_split, extractor=self._extractor.name)
        return stats

    def _floor_value(self, datamodule, device, rank: int, world: int) -> tuple[int, float]:
        floor_split = floor_split_for(self.real_split)
        pixels = real_pixels(datamodule, floor_split)[: self.n]
        floor_n = len(pixels)
        path = floor_cache_path(self.cache_dir, datamodule.dataset, datamodule.seed, self.real_split, floor_split,
                                floor_n, self._extractor)
        if all_ranks_agree(path.exists(), device):
            return floor_n, float(json.loads(path.read_text())["fid"])
        metric = make_fid_metric(self._extractor).to(device)
        set_real_statistics(metric, self._real_stats, owner=rank == 0)
        update_fake(metric, pixels[rank::world], self.feature_batch_size)
        value = float(metric.compute())
        if rank == 0:
            save_json(path, {"fid": value, "dataset": datamodule.dataset, "real_split": self.real_split,
                             "floor_split": floor_split, "n": floor_n, "extractor": self._extractor.name})
        return floor_n, value
