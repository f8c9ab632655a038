"""Evaluation metrics shared by every family: pure functions, no Lightning, no I/O.

The one place that decides *what* is measured and *how* is :mod:`lightning_flows.evaluation`.
"""

from lightning_flows.metrics.bits_per_dim import bits_per_dim
from lightning_flows.metrics.conditional import class_accuracy, class_conditional_distances, requested_classes
from lightning_flows.metrics.energy_distance import energy_distance
from lightning_flows.metrics.fid import frechet_distance, kernel_distance
from lightning_flows.metrics.mode_coverage import ModeCoverage, mode_coverage
from lightning_flows.metrics.precision_recall import precision_recall
from lightning_flows.metrics.straightness import PathStraightness, path_straightness

__all__ = ["bits_per_dim", "class_accuracy", "class_conditional_distances", "requested_classes",
           "energy_distance", "frechet_distance", "kernel_distance", "ModeCoverage", "mode_coverage",
           "precision_recall", "PathStraightness", "path_straightness"]
