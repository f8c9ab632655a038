"""The single evaluation path: callbacks, ``lightning-flows test`` and the benchmark all call it."""

from lightning_flows.evaluation.evaluator import KEYS, Evaluator, metric_names
from lightning_flows.evaluation.spec import EvaluationSpec, floor_split_for
from lightning_flows.evaluation.weights import sampling_weights, weights_in_use

__all__ = ["Evaluator", "EvaluationSpec", "KEYS", "floor_split_for", "metric_names", "sampling_weights",
           "weights_in_use"]
