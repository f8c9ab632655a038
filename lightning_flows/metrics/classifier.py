"""A small CNN trained on a dataset's labels, whose pooled features replace Inception for FID.

Inception-v3 needs a download and sees 8x8 digits blown up to 299x299; a classifier trained on the
data itself is small, offline and sensitive to what matters in those images (which digit, how
well drawn). Its FID is comparable only with other FIDs computed with the same classifier file.

Which images it sees. The test split of every labelled dataset is the same for every data seed (torchvision's
test sets; a fixed draw for the embedded ones), and it is the evaluation reference. The classifier trains on the
other (non-test) examples except a fixed hold-out of :data:`FLOOR_POOL_SIZE` of them, which is the FID floor's
real set: reference, floor and samples are then all images the classifier never saw, and the floor is the same
for every data seed. (A floor of training images is scored by features fitted to them; on digits the difference
is within noise -- 8 classifiers, FID of 500 seen vs 500 unseen digits: 7.19 vs 7.03 on average, each pair
differing by up to 3 --, ``experiments/benchmarks/evaluation_checks.py floor``; the hold-out rules it out by
construction.) :func:`classifier_data` makes the three sets.

The same weights on every machine. Training is deterministic on one machine (fixed seed and order, CPU, one
thread, deterministic algorithms), but another CPU type runs other vectorised kernels (AVX2 vs AVX-512, ...) and
ends with other weights after a few hundred steps. So the classifiers of the embedded datasets (``digits``,
``mnist5k``) ship inside the package (:data:`SHIPPED`, ~0.2 MB each), their sha256 checked at load like
Inception's; ``mnist`` and ``fashion_mnist`` (torchvision downloads) are trained on first use and cached, and
are identical only across machines of one CPU type. Regenerate or check a shipped file with
``python -m lightning_flows.metrics.train_classifier --dataset digits --check``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# 2: trained on one intra-op thread whatever the caller's count. 3: trained on the non-test examples minus the
# floor's hold-out (no longer the seed-0 training split, which contained the floor's images).
CLASSIFIER_VERSION = 3
LABELLED_DATASETS = ("digits", "mnist5k", "mnist", "fashion_mnist")
# Passes over the training examples: enough for ~97-99% test accuracy on each dataset.
DEFAULT_EPOCHS = {"digits": 30, "mnist5k": 15, "mnist": 3, "fashion_mnist": 3}
# Non-test examples held out of the classifier's training, a fixed draw: the real images of the FID floor.
FLOOR_POOL_SIZE = {"digits": 500, "mnist5k": 500, "mnist": 10_000, "fashion_mnist": 10_000}
FLOOR_POOL_SEED = 20
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# dataset -> (file under WEIGHTS_DIR, sha256 of the file, fingerprint of the weights): the classifiers shipped
# with the package, written by `python -m lightning_flows.metrics.train_classifier --dataset <name> --ship`.
SHIPPED: dict[str, tuple[str, str, str]] = {
    "digits": ("digits_classifier.pt",
               "33d521e4d4467f8411100031a81ffdd2a2db7e5bd2a1553a53bf9bd6cddf0916", "5c691ccc2c8e"),
    "mnist5k": ("mnist5k_classifier.pt",
                "34948961c6737b846339dc41ce5af41ec56ab315a8e13a67107a7727e8fa996b", "39e3555ae39f"),
}


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


@dataclass(frozen=True)
class ClassifierData:
    """The three image sets of a labelled dataset, each ``(images (N, C, H, W) in [0, 1], labels (N,))``:
    ``train`` (what the classifier learns from), ``floor`` (held out: the FID floor's real images) and ``test``
    (the evaluation reference, the same split for every data seed). Pairwise disjoint."""

    train: tuple[Tensor, Tensor]
    floor: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def classifier_data(dataset: str, data_dir: str = "data", download: bool = False) -> ClassifierData:
    """Split ``dataset``'s examples for its feature classifier (see the module docstring). Pixels are
    ``level / (levels - 1)``, what ``dm.to_pixels`` produces. The same sets for every data seed: the non-test
    examples are the same set whatever the seed, and they are taken in one fixed order (the seed-0 split's)."""
    from lightning_flows.data.registry import load_dataset

    if dataset not in LABELLED_DATASETS:
        raise ValueError(f"No labels to train a feature classifier on '{dataset}'. Labelled datasets: "
                         f"{', '.join(LABELLED_DATASETS)}; use feature_extractor='inception' otherwise.")
    splits = load_dataset(dataset, seed=0, data_dir=data_dir, download=download)
    scale = float(splits.info.levels - 1)
    images = torch.cat([splits.train, splits.val]).float() / scale
    labels = torch.cat([splits.train_labels, splits.val_labels]).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(FLOOR_POOL_SEED))
    floor, train = order[:FLOOR_POOL_SIZE[dataset]], order[FLOOR_POOL_SIZE[dataset]:]
    return ClassifierData(train=(images[train], labels[train]), floor=(images[floor], labels[floor]),
                          test=(splits.test.float() / scale, splits.test_labels.long()))


def train_classifier(dataset: str, epochs: int | None = None, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, data_dir: str = "data", download: bool = False, max_batches: int | None = None,
                     log=print) -> tuple[FeatureClassifier, float]:
    """Train deterministically on the CPU on :func:`classifier_data`'s ``train`` set; returns the classifier and
    its test accuracy (the test split is only measured, never trained on or used to choose anything).

    ``max_batches`` caps the batches per epoch (quick checks only; the cached classifier uses all).
    """
    data = classifier_data(dataset, data_dir, download)
    (images, labels), (test_images, test_labels) = data.train, data.test
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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_classifier(path: str | Path, sha256: str | None = None) -> FeatureClassifier:
    """The classifier saved at ``path`` (``weights_only``: tensors and plain values only); with ``sha256``,
    the file must have exactly that hash (a shipped classifier)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No feature classifier at {path}. Train it with `python -m "
                                f"lightning_flows.metrics.train_classifier --dataset <name> --cache-dir <dir>`.")
    if sha256 is not None and file_sha256(path) != sha256:
        raise RuntimeError(f"The feature classifier {path} has sha256 {file_sha256(path)}, not the {sha256} this "
                           f"version of lightning-flows shipped: the file was changed or damaged, and its FIDs would "
                           f"not be comparable. Reinstall the package (pip install --force-reinstall lightning-flows, "
                           f"or git checkout the file in a source checkout).")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = FeatureClassifier(in_channels=payload["in_channels"], num_classes=payload["num_classes"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def shipped_classifier_path(dataset: str) -> Path | None:
    """The classifier file the package ships for ``dataset``, or None."""
    return WEIGHTS_DIR / SHIPPED[dataset][0] if dataset in SHIPPED else None


def load_or_train_classifier(dataset: str, cache_dir: str | Path | None = None, data_dir: str = "data",
                             train_if_missing: bool = True) -> FeatureClassifier:
    """The shipped classifier of ``dataset`` (hash checked), else the cached one, trained (deterministically)
    and cached on first use."""
    if dataset in SHIPPED:
        return load_classifier(shipped_classifier_path(dataset), sha256=SHIPPED[dataset][1])
    path = classifier_path(dataset, cache_dir)
    if not path.exists() and train_if_missing:
        model, accuracy = train_classifier(dataset, data_dir=data_dir, log=lambda message: None)
        save_classifier(model, path, dataset, accuracy)
    return load_classifier(path)
