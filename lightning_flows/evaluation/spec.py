"""What one evaluation measures: a plain dataclass, the same for callbacks, ``lightning-flows test`` and
the benchmark (a suite's ``evaluation:`` block is this dataclass's fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SPLITS = ("train", "val", "test")


@dataclass
class EvaluationSpec:
    """Args:
        n_samples: generated samples for sample quality (FID/KID/precision-recall on images; energy
            distance, precision-recall and mode coverage on 2D data), drawn in chunks of
            ``sample_batch_size`` (the same batch for every family, so ms/sample compares like with like).
        seed: chunk ``i`` of the samples and batch ``i`` of a stochastic likelihood are seeded from it,
            so the numbers are identical for any number of DDP ranks and across reruns.
        seed_samples_per_run: draw the samples with a sampling seed of each run's own (``seed + 1000 *
            run seed``, the run seed being the one ``seed_everything`` was given; the result records it as
            ``sampling_seed``), so that the spread over training seeds covers sampling noise too and is
            not the training noise of one shared draw; run seed 0 keeps ``seed``. Off: every run draws with
            ``seed`` (common random numbers). Likelihood draws always use ``seed``.
        sampling_std_draws: also draw this many more sample sets (each ``n_samples``, sampling seeds
            ``sampling_seed + 1, + 2, ...``) and report the sample std over all ``1 + sampling_std_draws`` sets
            of the cheap sample metrics as ``<metric>_sampling_std``: the sampling noise of one model, to set
            beside the spread over training seeds. 0: not measured.
        likelihood: report every likelihood the family has (exact, bound or unbiased estimate).
        likelihood_split, likelihood_batch_size, max_likelihood_examples: what the NLL is averaged over.
        iw_samples: discrete data: dequantisation draws ``K`` per example for the importance-weighted
            likelihood of every continuous density (``nll_iw_<kind>``, see
            :mod:`lightning_flows.evaluation.likelihood_labels`); it costs ``K - 1`` more likelihood passes.
            1: not computed.
        iw_estimates: also importance-weight likelihoods that are unbiased estimates of ``log p`` (Hutchinson's
            trace). Off by default: the log-mean-exp of noisy log-densities is no bound and is biased low by the
            probe noise (a quick-budget digits CNF: IW-8 gain 0.055 bits/dim with Hutchinson's trace vs 0.0095
            with the exact trace, same weights), and each draw is another ODE solve.
        quality: report sample quality.
        reference_split: the real data the samples are compared with. The floor compares another split
            (train if the reference is val/test, else test) at the same n with the same reference.
        feature_extractor: ``classifier`` (offline, comparable only with itself) or ``inception``
            (comparable with published FIDs only at n = 10k/50k against the same split);
            ``feature_extractor_weights_path``: local weights file.
        fid_sample_counts: also report FID on the first n samples for each n here (e.g. ``[10000]`` beside
            50k, the two counts published FIDs use), as ``fid_n<n>``.
        kid_subsets: subsets KID averages over (``kid_std``, their std, is a usable error bar from ~10);
            ``pr_k``: the k of the k-NN precision/recall.
        null_draws: 2D data: real-vs-real draws at the samples' n (fresh draws of a toy density's sampler, else
            resplits of the floor split) whose std is the null std of the energy distance, the kernel MMD and
            the cross-entropy gap. 200: over 600 draws of 8 Gaussians at n = 2,000, the energy distance's std in
            blocks of 20 ranged from 0.43x to 1.59x the std of all 600 (the former default's 20 were the lowest,
            0.43x), in blocks of 200 from 0.97x to 1.06x (``python experiments/benchmarks/evaluation_checks.py
            null``). ~15 s a dataset and n, once (cached). Not part of a benchmark run's key: the null is data
            only, and a report recomputes it for every row it shows
            (:func:`lightning_flows.evaluation.point_quality.refresh_nulls`).
        timing: measure ms/sample (after one warm-up call) and NFE/sample.
        straightness_paths: families that sample by an ODE (``model.sampling_ode()``): how many paths from
            noise to measure the straightness of (:func:`lightning_flows.metrics.path_straightness`); 0: none.
        straightness_steps: midpoint steps of those paths (the field is read at each step's start and end).
        extras: family-specific numbers for the lecture's "key limitation" (VAE posterior gap).
        guidance: classifier-free guidance weight ``w`` of a class-conditional model's samples (1: the
            conditional model; families without guidance accept only 1). Ignored for unconditional models.
        class_metrics: class-conditional models on labelled image data: draw the samples for requested classes
            (``0, 1, ..., K-1, 0, ...``: equal counts per class when ``n_samples`` is a multiple of ``K``) and
            report the feature classifier's accuracy on them and class-conditional FID/KID. Off: samples with
            uniformly random classes, unconditional metrics only.
        cache_dir: reference features and classifiers (default ``$LIGHTNING_FLOWS_CACHE``).
        progress: show progress bars on rank zero.
    """

    n_samples: int = 2000
    sample_batch_size: int = 500
    seed: int = 0
    seed_samples_per_run: bool = True
    sampling_std_draws: int = 0
    likelihood: bool = True
    likelihood_split: str = "test"
    likelihood_batch_size: int = 500
    max_likelihood_examples: int | None = None
    iw_samples: int = 8
    iw_estimates: bool = False
    quality: bool = True
    reference_split: str = "test"
    feature_extractor: str = "classifier"
    feature_extractor_weights_path: str | None = None
    fid_sample_counts: list[int] | None = None
    kid_subsets: int = 100
    pr_k: int = 3
    null_draws: int = 200
    timing: bool = True
    straightness_paths: int = 0
    straightness_steps: int = 50
    extras: bool = True
    guidance: float = 1.0
    class_metrics: bool = True
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("likelihood_split", "reference_split"):
            if getattr(self, name) not in SPLITS:
                raise ValueError(f"{name} must be one of {', '.join(SPLITS)}, got '{getattr(self, name)}'.")
        if self.n_samples < 2 or self.sample_batch_size < 1 or self.likelihood_batch_size < 1:
            raise ValueError(f"n_samples must be >= 2 and the batch sizes >= 1, got n_samples={self.n_samples}, "
                             f"sample_batch_size={self.sample_batch_size}, "
                             f"likelihood_batch_size={self.likelihood_batch_size}.")
        if self.straightness_paths < 0 or self.straightness_steps < 1:
            raise ValueError(f"straightness_paths must be >= 0 (0: not measured) and straightness_steps >= 1, got "
                             f"{self.straightness_paths} and {self.straightness_steps}.")
        if self.pr_k < 1 or self.kid_subsets < 1:
            raise ValueError(f"pr_k and kid_subsets must be >= 1, got {self.pr_k} and {self.kid_subsets}.")
        if self.iw_samples < 1 or self.sampling_std_draws < 0 or self.null_draws < 2:
            raise ValueError(f"iw_samples must be >= 1 (1: no importance weighting), sampling_std_draws >= 0 and "
                             f"null_draws >= 2, got {self.iw_samples}, {self.sampling_std_draws} and "
                             f"{self.null_draws}.")

    @classmethod
    def from_dict(cls, values: dict | None) -> "EvaluationSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise ValueError(f"Unknown evaluation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**(values or {}))

    def to_dict(self) -> dict:
        return asdict(self)


def floor_split_for(reference_split: str) -> str:
    """The split compared with the reference for the real-vs-real floor."""
    return "test" if reference_split == "train" else "train"
