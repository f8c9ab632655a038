"""Pluggable FID feature extractors: pixels in [0, 1] -> feature vectors.

Every extractor takes ``pixels: (B, C, H, W)`` floats in [0, 1] (what ``dm.to_pixels`` returns)
and returns ``(B, num_features)`` float64 features; it carries ``name`` and ``fingerprint`` (a hash
of its weights) so that cached real-data statistics are never reused with other weights.

- ``inception``: torch-fidelity's Inception-v3 pool features (2048-d), the published-FID network.
  Its own resize is TensorFlow-1 bilinear *without* antialiasing, as in the original FID code
  (torchmetrics >= 1.8 antialiases by default, which shifts FID). Grey images are repeated to 3
  channels; pixels are rounded to uint8 as the reference implementation expects.
- ``classifier``: a small CNN trained on the dataset's labels (see ``classifier.py``); offline and
  suited to small images, comparable only with itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_flows.metrics.classifier import (FeatureClassifier, classifier_path, load_classifier,
                                                load_or_train_classifier, state_fingerprint)

FEATURE_EXTRACTORS = ("inception", "classifier")


class _FrozenExtractor(nn.Module):
    """Always in eval mode (BatchNorm statistics must not move) and never trained."""

    name = "extractor"
    num_features: int

    def train(self, mode: bool = True) -> "_FrozenExtractor":
        return super().train(False)

    def forward(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 4:
            raise ValueError(f"FID feature extractors take image batches (B, C, H, W); got shape "
                             f"{tuple(pixels.shape)}. FID is defined for image datasets only.")
        if pixels.shape[0] == 0:  # a DDP rank with no samples still calls update()
            return torch.zeros(0, self.num_features, dtype=torch.float64, device=pixels.device)
        with torch.no_grad():
            return self.extract(pixels).double()

    def extract(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError


class ClassifierFeatures(_FrozenExtractor):
    """Pooled features of a :class:`FeatureClassifier`: ``(B, C, H, W)`` -> ``(B, 64)``."""

    name = "classifier"

    def __init__(self, classifier: FeatureClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features
        self.fingerprint = state_fingerprint(classifier)

    def extract(self, pixels: Tensor) -> Tensor:
        return self.classifier.features(pixels.to(next(self.classifier.parameters()).dtype))


def inception_state_dict(weights_path: str | Path | None = None) -> dict[str, Tensor]:
    """torch-fidelity's Inception-v3 weights, read with ``weights_only=True``: from ``weights_path``, or
    downloaded into (or found in) torch.hub's cache. Raises with the fix: a missing file, no network, a file
    that is not a plain state dict (e.g. one that would run code when unpickled)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if weights_path is None:
        try:
            # (torch.hub's own default is weights_only=False, also in torch >= 2.6: a cached file is untrusted too.)
            return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=False,
                                                      weights_only=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"Could not download torch-fidelity's Inception-v3 weights ({err}). Offline, fetch {URL_INCEPTION_V3} "
                f"on a connected machine and pass the local file: feature_extractor_weights_path=<file.pth> "
                f"(FIDCallback's init arg, e.g. --trainer.callbacks.init_args.feature_extractor_weights_path), or "
                f"put it in torch.hub's cache ({Path(torch.hub.get_dir()) / 'checkpoints'}).") from err
        except pickle.UnpicklingError as err:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
            from lightning_flows.checkpoints import load_failure

            raise RuntimeError(f"The cached Inception-v3 weights {cached} are not a plain state dict "
                               f"({load_failure(err)}); refusing to load them. Delete the file "
                               f"and download it again from {URL_INCEPTION_V3}.") from err
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"Inception weights file {weights_path} does not exist; pass the path of "
                                f"{URL_INCEPTION_V3.rsplit('/', 1)[-1]} as feature_extractor_weights_path.")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or pickled objects other than tensors
        from lightning_flows.checkpoints import load_failure

        raise RuntimeError(f"Could not read Inception weights file {weights_path} as a state dict "
                           f"({load_failure(err)}); refusing to load it. Pass "
                           f"{URL_INCEPTION_V3.rsplit('/', 1)[-1]} ({URL_INCEPTION_V3}) as "
                           f"feature_extractor_weights_path.") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise RuntimeError(f"Inception weights file {weights_path} holds a {type(state).__name__}, not a state dict "
                           f"of tensors; pass {URL_INCEPTION_V3.rsplit('/', 1)[-1]} as feature_extractor_weights_path.")
    return state


class InceptionFeatures(_FrozenExtractor):
    """torch-fidelity's Inception-v3, 2048-d pool3 features: ``(B, 1 or 3, H, W)`` -> ``(B, 2048)``.

    ``weights_path``: a local state dict; ``None`` downloads torch-fidelity's converted TensorFlow weights
    (cached by torch.hub). Either way the file is read here with ``weights_only=True``
    (:func:`inception_state_dict`), never by torch-fidelity.
    """

    name = "inception"

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        state = inception_state_dict(weights_path)
        # torch-fidelity's network loads its weights in its constructor with `torch.load(..., weights_only=False)`;
        # it gets the tensors read above, re-serialised in memory, so no file's pickle ever reaches that call.
        tensors = io.BytesIO()
        torch.save(state, tensors)
        tensors.seek(0)
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                   feature_extractor_weights_path=tensors)
        self.num_features = 2048
        self.fingerprint = state_fingerprint(self.network)

    def extract(self, pixels: Tensor) -> Tensor:
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {pixels.shape[1]}.")
        uint8 = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.network(uint8)[0]


def build_feature_extractor(name: str, dataset: str | None = None, weights_path: str | Path | None = None,
                            cache_dir: str | Path | None = None, data_dir: str = "data") -> _FrozenExtractor:
    """``inception`` (weights from ``weights_path`` or torch-fidelity's download) or ``classifier``
    (weights from ``weights_path``, else the cached classifier of ``dataset``, trained on first use)."""
    if name == "inception":
        return InceptionFeatures(weights_path)
    if name == "classifier":
        if weights_path is not None:
            return ClassifierFeatures(load_classifier(weights_path))
        if dataset is None:
            raise ValueError("The classifier extractor needs the dataset name to find its classifier.")
        return ClassifierFeatures(load_or_train_classifier(dataset, cache_dir, data_dir=data_dir))
    raise ValueError(f"Unknown feature extractor '{name}'. Choose one of: {', '.join(FEATURE_EXTRACTORS)}.")


def classifier_is_cached(dataset: str, cache_dir: str | Path | None = None) -> bool:
    return classifier_path(dataset, cache_dir).exists()
