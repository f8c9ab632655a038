"""Metrics of class-conditional samples: does a sample drawn for class ``c`` look like class ``c``?

* :func:`class_accuracy`: the fraction of samples a fixed classifier assigns to the class they were drawn
  for (1.0: every requested class came out as asked; a model that ignores the label scores ~1/K).
* :func:`class_conditional_distances`: FID and KID between the real examples of class ``c`` and the samples
  drawn for ``c``, averaged over the classes (a model that draws good images of the wrong class scores
  badly here, while its unconditional FID can be perfect).

Pure functions on features and labels; :mod:`lightning_flows.evaluation` decides what is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_flows.metrics.fid import frechet_distance, kernel_distance


def requested_classes(n: int, num_classes: int) -> Tensor:
    """The classes ``(n,)`` an evaluation requests, ``0, 1, ..., K-1, 0, 1, ...``: equal counts per class when
    ``n`` is a multiple of ``K`` (at most one apart otherwise), and every chunk of consecutive samples as
    balanced as its length allows."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    return torch.arange(n) % num_classes


def class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of ``logits: (N, K)`` whose argmax is ``labels: (N,)``."""
    if logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need one label per row of logits, got {tuple(logits.shape)} and {tuple(labels.shape)}.")
    return (logits.argmax(1).cpu() == labels.cpu()).double().mean().item()


@dataclass
class ClassConditionalDistances:
    """Means over ``classes`` of the per-class FID and KID; ``per_class_fid``: ``{class: FID}``."""

    fid: float
    kid: float
    classes: int
    per_class_fid: dict[int, float]


def class_conditional_distances(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor,
                                kid_subsets: int = 100, seed: int = 0) -> ClassConditionalDistances:
    """FID / KID of ``fake: (M, F)`` against ``real: (N, F)`` within each class of ``fake_labels``, averaged.

    Every class of ``fake_labels`` needs at least 2 real and 2 generated examples (FID's covariance).
    """
    per_fid, per_kid = {}, []
    for c in sorted(set(fake_labels.tolist())):
        real_c, fake_c = real[real_labels == c], fake[fake_labels == c]
        if min(len(real_c), len(fake_c)) < 2:
            raise ValueError(f"class {c} has {len(real_c)} real and {len(fake_c)} generated examples; class-"
                             f"conditional FID needs >= 2 of each (draw more samples: n_samples).")
        per_fid[c] = frechet_distance(real_c, fake_c)
        per_kid.append(kernel_distance(real_c, fake_c, kid_subsets, seed=seed)[0])
    return ClassConditionalDistances(fid=sum(per_fid.values()) / len(per_fid), kid=sum(per_kid) / len(per_kid),
                                     classes=len(per_fid), per_class_fid=per_fid)
