"""A small CNN trained on a dataset's labels, whose pooled features replace Inception for FID.

Inception-v3 needs a download and sees 8x8 digits blown up to 299x299; a classifier trained on the
data itself is small, offline and sensitive to what matters in those images (which digit, how
well drawn). Its FID is comparable only with other FIDs computed with the same classifier file.

Training is deterministic (fixed seed, fixed order, CPU, deterministic algorithms) and always uses
the dataset's split with seed 0, so one classifier per dataset serves every run. Regenerate with
``python -m lightning_flows.metrics.train_classifier --dataset digits``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

# 2: trained on one intra-op thread whatever the caller's count, so every machine trains the same weights.
CLASSIFIER_VERSION = 2
LABELLED_DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist")
# Passes over the training split: enough for ~97-99% test accuracy on each dataset.
DEFAULT_EPOCHS = {"digits": 30, "mnist5k": 15, "mnist": 3, "fashion_mnist": 3}


def default_cache_dir() -> Path:
    """``$LIGHTNING_FLOWS_CACHE`` if set, else ``~/.cache/lightning_flows``."""
    return Path(os.environ.get("LIGHTNING_FLOWS_CACHE", Path.home() / ".cache" / "lightning_flows")).expanduser()


def classifier_path(dataset: str, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "classifiers" / f"{dataset}_v{CLASSIFIER_VERSION}.pt"


class FeatureClassifier(nn.Module):
    """Three conv layers, global average pooling (the features) and a linear head (the labels).

    ``x: (B, C, H, W)`` pixel intensities in [0, 1]; works for any H, W >= 4.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, num_features: int = 64):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, num_features, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, pixels: Tensor) -> Tensor:
        """``(B, C, H, W)`` in [0, 1] -> ``(B, num_features)``."""
        return self.body(2.0 * pixels - 1.0)

    def forward(self, pixels: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(pixels))


def state_fingerprint(module: nn.Module) -> str:
    """Short hash of the weights: cached FID statistics are keyed by it, so new weights never
    reuse statistics computed with old ones."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def labelled_pixels(dataset: str, split: str, data_dir: str = "data", download: bool = False) -> tuple[Tensor, Tensor]:
    """Images of ``split`` (``train`` or ``test``) of the seed-0 split as ``(N, C, H, W)`` floats in
    [0, 1] (``level / (levels - 1)``, what ``dm.to_pixels`` produces) and their labels ``(N,)``."""
    from lightning_flows.data.registry import load_dataset

    if dataset not in LABELLED_DATASETS:
        raise ValueError(f"No labels to train a feature classifier on '{dataset}'. Labelled datasets: "
                         f"{', '.join(LABELLED_DATASETS)}; use feature_extractor='inception' otherwise.")
    splits = load_dataset(dataset, seed=0, data_dir=data_dir, download=download)
    images, labels = getattr(splits, split), getattr(splits, f"{split}_labels")
    return images.float() / (splits.info.levels - 1), labels.long()


def train_classifier(dataset: str, epochs: int | None = None, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, data_dir: str = "data", download: bool = False, max_batches: int | None = None,
                     log=print) -> tuple[FeatureClassifier, float]:
    """Train deterministically on the CPU; returns the classifier and its test accuracy.

    ``max_batches`` caps the batches per epoch (quick checks only; the cached classifier uses all).
    """
    images, labels = labelled_pixels(dataset, "train", data_dir, download)
    test_images, test_labels = labelled_pixels(dataset, "test", data_dir, download)
    epochs = epochs or DEFAULT_EPOCHS[dataset]
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One intra-op thread: a CPU reduction split over more threads sums in another order, and after 30
    # epochs that is other weights (another fingerprint, FID different in the first decimal), so the
    # cached classifier would depend on the cores of the machine (or the benchmark's --jobs) that trained it.
    torch.set_num_threads(1)
    try:
        # Training may be triggered from inside Lightning's evaluation (inference mode, no grad).
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            model = FeatureClassifier(in_channels=images.shape[1], num_classes=int(labels.max()) + 1)
            optimiser = torch.optim.Adam(model.parameters(), lr=lr)
            order_gen = torch.Generator().manual_seed(seed)
            for epoch in range(epochs):
                model.train()
                batches = torch.randperm(len(images), generator=order_gen).split(batch_size)
                for idx in batches[:max_batches]:
                    loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                accuracy = classifier_accuracy(model, test_images, test_labels)
                log(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.4f}, test accuracy {accuracy:.4f}")
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
    return model.eval(), accuracy


@torch.no_grad()
def classifier_accuracy(model: FeatureClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def save_classifier(model: FeatureClassifier, path: Path, dataset: str, accuracy: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "dataset": dataset, "version": CLASSIFIER_VERSION,
                "in_channels": model.body[0].in_channels, "num_classes": model.head.out_features,
                "test_accuracy": accuracy}, tmp)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    return path


def load_classifier(path: str | Path) -> FeatureClassifier:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No feature classifier at {path}. Train it with `python -m "
                                f"lightning_flows.metrics.train_classifier --dataset <name> --cache-dir <dir>`.")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = FeatureClassifier(in_channels=payload["in_channels"], num_classes=payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def load_or_train_classifier(dataset: str, cache_dir: str | Path | None = None, data_dir: str = "data",
                             train_if_missing: bool = True) -> FeatureClassifier:
    """The cached classifier for ``dataset``, trained (deterministically) and cached on first use."""
    path = classifier_path(dataset, cache_dir)
    if not path.exists() and train_if_missing:
        model, accuracy = train_classifier(dataset, data_dir=data_dir, log=lambda message: None)
        save_classifier(model, path, dataset, accuracy)
    return load_classifier(path)
