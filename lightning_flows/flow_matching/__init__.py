"""Flow matching's pieces beyond the network: path, time sampling, couplings, batch preparation, reflow.

The model (:class:`lightning_flows.models.FlowMatching`) composes them; each formula lives in one module:
``paths`` (x_t and its target), ``time_sampling`` (t), ``couplings`` (which x0 goes with which x1),
``batch`` (one step's random draws), ``pipeline`` (preparing batches ahead of the step), ``reflow``;
MeanFlow's (:class:`lightning_flows.models.MeanFlow`) in ``mean_flow``, the ODE likelihood's options in ``likelihood``.
"""

from lightning_flows.flow_matching.batch import FlowMatchingBatch, TrainingBatchDraw
from lightning_flows.flow_matching.couplings import (
    COUPLINGS, IndependentCoupling, MinibatchOTCoupling, PairedCoupling, ot_permutation, squared_distances,
)
from lightning_flows.flow_matching.likelihood import ODELikelihoodOptions
from lightning_flows.flow_matching.mean_flow import AdaptiveWeighting, MeanFlowTimes, adaptive_loss, mean_flow_target
from lightning_flows.flow_matching.paths import linear_path
from lightning_flows.flow_matching.pipeline import BackgroundBatches, batch_generator
from lightning_flows.flow_matching.reflow import generate_reflow_pairs, load_teacher, reflow_noise
from lightning_flows.flow_matching.time_sampling import TIME_SAMPLINGS, TimeSampler

__all__ = ["FlowMatchingBatch", "TrainingBatchDraw", "COUPLINGS", "IndependentCoupling", "MinibatchOTCoupling",
           "PairedCoupling", "ot_permutation", "squared_distances", "linear_path", "BackgroundBatches",
           "batch_generator", "generate_reflow_pairs", "load_teacher", "reflow_noise", "TIME_SAMPLINGS",
           "TimeSampler", "AdaptiveWeighting", "MeanFlowTimes", "adaptive_loss", "mean_flow_target",
           "ODELikelihoodOptions"]
