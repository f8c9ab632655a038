"""The one evaluator: every number of the callbacks, ``lightning-flows test`` and the benchmark.

``Evaluator(spec).evaluate(model, datamodule)`` returns one flat dict (short, stable keys; see
:data:`KEYS`), with the labels a number needs to be read correctly (likelihood kind, extractor,
sample counts, which weights). It draws the samples once and feeds every quality metric and the
sampling-cost timer from them; under DDP each rank draws and featurises its share, and every rank
ends with the same values (identical to a single process on the same samples).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar
from torch import Tensor

from lightning_flows.evaluation.likelihood import Dequantisation, split_likelihood
from lightning_flows.evaluation.likelihood_labels import is_upper_bound, iw_label, label, likelihood_traits
from lightning_flows.evaluation.point_quality import (SAMPLING_STD_METRICS, PointReference, mean_and_std, null_fields,
                                                      point_metrics, point_reference, refresh_nulls)
from lightning_flows.evaluation.reference import (FloorSet, build_extractor, extract_features, floor_features,
                                                  floor_set, real_pixels, reference_features)
from lightning_flows.evaluation.samples import chunk_seed, gather_chunks, generate_chunks, rank_chunks, warm_up
from lightning_flows.evaluation.spec import EvaluationSpec, floor_split_for
from lightning_flows.metrics import (class_accuracy, class_conditional_distances, energy_distance, frechet_distance,
                                     kernel_distance, path_straightness, precision_recall, requested_classes)
from lightning_flows.metrics.classifier import default_cache_dir
from lightning_flows.metrics.fid import kid_subset_size
from lightning_flows.metrics.distributed import rank_and_world
from lightning_flows.metrics.sampling_cost import SamplingCost
from lightning_flows.ode import SolverConfig, integrate
from lightning_flows.ode.solve import observe_field_evaluations

# What each key of a result means (the table, results.json and loggers use these names). <kind> is a family's
# likelihood kind: exact | bound | estimate.
KEYS = {
    "weights": "which weights were evaluated: 'ema' (the run's average, what `sample` uses) or 'training'",
    "sampling_seed": "the seed the samples were drawn with (EvaluationSpec.seed + 1000 x the run's seed with "
                     "seed_samples_per_run, so each training seed draws its own samples; else the spec's seed)",
    "torch_threads": "torch intra-op threads the evaluation (and, in a benchmark worker, the training) ran with",
    "nll_<kind>": "mean negative log-likelihood, nats per example in model space, on the split's fixed evaluation "
                  "dequantisation (one draw per example) (class-conditional flow matching / diffusion: of their "
                  "null-class, i.e. unconditional, field)",
    "bpd_<kind>": "the same NLL as bits per dimension of the discrete data (through metrics.bits_per_dim)",
    "likelihood_label_<kind>": "what nll_<kind> is: continuous data 'exact', 'estimate (Hutchinson)', 'ELBO / "
                               "IWAE-K bound', 'DDPM bound'; discrete data 'dequantised bound' (a continuous density "
                               "at one uniform dequantisation draw), 'dequantised bound, unbiased estimate "
                               "(Hutchinson)', 'ELBO / IWAE-K bound' / 'DDPM bound' (a discrete decoder: directly on "
                               "log P(k)), 'dequantised ELBO / IWAE-K bound', 'dequantised DDPM bound'",
    "nll_upper_bound_<kind>": "True when E[nll_<kind>] >= the model's own NLL of the same examples (discrete data: "
                              "the discrete NLL -log P(k), so all such rows bound the same quantity; an exact value "
                              "counts, with equality); False when it may lie below it",
    "nll_iw_<kind> / bpd_iw_<kind>": "discrete data, continuous densities (exact, or IWAE; Hutchinson estimates "
                                     "only with iw_estimates): -log (1/K) sum_k p(k + u_k) over K = iw_samples "
                                     "dequantisation draws (draw 0: the fixed evaluation noise), nats per example / "
                                     "bits per dimension; tightens towards -log P(k) with K",
    "likelihood_label_iw_<kind>": "'discrete, IW-K bound' (an exact density or an unbiased density estimate: an "
                                  "upper bound on the discrete NLL), or 'discrete, IW-K estimate (Hutchinson: ...)' "
                                  "(an estimate of that bound, either side of it)",
    "nll_upper_bound_iw_<kind>": "as nll_upper_bound_<kind>, for the IW value (False for Hutchinson's)",
    "bpd_iw_gain_<kind>": "bpd_<kind> - bpd_iw_<kind>: the dequantisation gap recovered by K draws (>= 0 in "
                          "expectation), on the same examples",
    "iw_samples": "K, the dequantisation draws per example of the nll_iw_* numbers",
    "nll_discrete / bpd_discrete": "discrete data: the lowest of the model's NLLs flagged as upper bounds on the "
                                   "discrete NLL (IW-K, a discrete decoder's bound, the dequantised bound, ...), all "
                                   "on the same examples: the number to compare rows on",
    "likelihood_label_discrete / likelihood_source_discrete": "its label, and the key it was taken from "
                                                             "(e.g. 'bpd_iw_exact')",
    "nll_gap_<kind>": "NLL minus the data's true entropy (toy densities with a known density); 0 is the limit",
    "true_entropy_nats": "the data's entropy on the same examples, -mean log p_data",
    "likelihood_examples": "examples the NLL averages over",
    "posterior_gap_nats": "VAE: IWAE_K bound minus ELBO, nats per example (the lecture's posterior gap); not "
                          "reported for a conditional VAE, whose likelihood here is the marginal over classes",
    "nfe_per_sample": "network evaluations per generated sample",
    "ms_per_sample": "device-milliseconds per sample after one warm-up call, at sample_batch_size per call",
    "sample_mode": "families with several ways to sample (VAE): how the quality samples were drawn ('mean': "
                   "decoder means, not draws from the model whose likelihood is reported; 'sample': true draws)",
    "<metric>_true_draws": "a VAE sampling decoder means: the same image metric (fid, kid, precision, recall) on "
                           "true draws x ~ p(x) of the model whose likelihood is reported, same sampling seed",
    "fid / fid_floor": "FID of the samples / of the floor set's first n_floor images, against the reference split",
    "floor_split": "the floor's real images: a split, or 'classifier_holdout' (non-test images held out of the "
                   "built-in feature classifier's training, the same for every data seed: unseen by it, like the "
                   "reference and the samples)",
    "fid_at_floor_n": "only when n_floor < n_quality (the floor set holds fewer images than were sampled): FID of "
                      "the first n_floor samples, the model's FID at the floor's n",
    "fid_n<n>": "FID of the first n samples (EvaluationSpec.fid_sample_counts)",
    "fid_nfe<k> / energy_distance_nfe<k>": "the same quality metric for another sampling setting of the model at k "
                                           "NFE/sample (GenerativeModel.sampling_variants, e.g. MeanFlow's 2 steps)",
    "kid / kid_std / kid_floor": "unbiased KID (mean over kid_subsets subsets of kid_subset_size, at most half the "
                                 "smaller set so subsets differ), its std over the subsets (the noise at that subset "
                                 "size; a usable error bar from ~10 subsets on) and the floor's KID",
    "precision / recall": "k-NN precision and recall in feature space (2D data: the coordinates)",
    "energy_distance / energy_distance_floor": "2D data: energy distance (unbiased: negative values are legitimate "
                                               "estimator outcomes) to the reference, and the floor split's",
    "mmd / mmd_bandwidth": "2D data: unbiased Gaussian-kernel MMD^2 to the reference (can be negative), kernel std "
                           "(a mixture's component std where declared, else the median heuristic: "
                           "mmd_bandwidth_source)",
    "ce_gap_nats": "toy densities with a known log p: E_samples[-log p_true] - H(p_true), nats (0 for real data; "
                   "large when mass lies between the modes; negative when concentrated on the modes); not KL(q||p)",
    "off_support_fraction": "instead of ce_gap_nats where the true density is 0 at some sample: that fraction",
    "<metric>_null_mean / <metric>_null_std": "energy_distance, mmd, ce_gap_nats of null_draws real sets of n "
                                              "points (null_source) against the same reference: mean and sample std",
    "<metric>_within_noise": "|metric - null mean| <= 2 null std: indistinguishable from real data at this n",
    "<metric>_sampling_std / sampling_std_sets": "sample std of a cheap sample metric over sampling_std_sets sample "
                                                 "sets of one model (the main one and sampling_std_draws more): the "
                                                 "sampling noise, to read beside the spread over training seeds",
    "modes_hit / mode_kl / good_fraction": "8gaussians: modes receiving >= 1% of samples, KL(mode histogram || "
                                           "uniform) in nats, fraction of samples within 3 std of a mode",
    "straightness / straightness_rel": "ODE samplers: mean Liu et al. straightness S of straightness_paths paths "
                                       "from noise (0 = straight at constant speed), and S / kinetic energy in [0, 1]",
    "guidance": "class-conditional models: the classifier-free guidance weight w the samples were drawn with",
    "class_accuracy": "class-conditional models: fraction of samples the feature classifier assigns to the class "
                      "they were drawn for (equal counts per class; 1.0 = every class as asked, ~1/K = label ignored)",
    "class_accuracy_real": "the same classifier's accuracy on the real reference split (the attainable ceiling)",
    "class_fid / class_fid_floor": "class-conditional FID: per class, the reference split's examples of that class "
                                   "vs the samples drawn for it (floor: the floor set's), averaged over classes",
    "class_kid / class_kid_floor": "class-conditional KID, averaged over classes the same way",
}

RUN_SEED_STRIDE = 1000  # sampling seed = spec.seed + RUN_SEED_STRIDE * run seed
IMAGE_SAMPLING_STD_METRICS = ("fid", "kid", "precision", "recall")


def run_seed_of_process() -> int | None:
    """The run's seed as ``seed_everything`` recorded it (``PL_GLOBAL_SEED``; also what
    :class:`lightning_flows.callbacks.PerStepSeed` reads), or None outside a seeded run."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None


class Evaluator:
    """Measure a model on a DataModule as ``spec`` says. Holds the feature extractor and the reference
    features between calls, so a callback that evaluates every few epochs pays for them once."""

    def __init__(self, spec: EvaluationSpec | None = None):
        self.spec = spec or EvaluationSpec()
        self.cache_dir = Path(self.spec.cache_dir).expanduser() if self.spec.cache_dir else default_cache_dir()
        self._extractor = None
        self._label_classifier = None  # the feature classifier whose labels score conditional samples
        self._reference: dict[tuple, tuple[Tensor, Tensor, FloorSet]] = {}  # -> (reference, floor features, floor)
        self._point_reference: dict[tuple, PointReference] = {}  # (dataset, seed, split, n) -> data-only references
        self._point_floor: dict[tuple, float] = {}  # (dataset, seed, split, n) -> energy distance of the floor
        self.last_samples: Tensor | None = None  # the evaluated samples, model space, every rank
        self.last_rank_samples = 0  # how many of them this rank drew
        self.last_labels: Tensor | None = None  # the classes they were drawn for (class-conditional models)
        self.last_likelihood_keys: set[str] = set()  # the keys of the last result that describe its likelihood split

    # ---- the entry point ----
    def evaluate(self, model, datamodule, weights: str = "training", likelihood_split: str | None = None,
                 max_likelihood_examples: int | None = None, run_seed: int | None = None) -> dict:
        """All of ``spec``'s numbers for ``model`` on ``datamodule``; a collective under DDP.

        ``weights`` is recorded as given (see :mod:`lightning_flows.evaluation.weights`);
        ``likelihood_split`` / ``max_likelihood_examples`` override the spec (callbacks use the
        stage's split and honour ``limit_val_batches``). ``run_seed``: the training run's seed, from which the
        sampling seed is derived (``spec.seed_samples_per_run``); default the one ``seed_everything`` recorded.
        """
        spec = self.spec
        datamodule.setup()
        rank, world = rank_and_world()
        was_training = model.training
        model.eval()
        if run_seed is None:
            run_seed = run_seed_of_process()
        self._sampling_seed = spec.seed + (RUN_SEED_STRIDE * run_seed if spec.seed_samples_per_run and run_seed
                                           else 0)
        result: dict = {"weights": weights, "dataset": datamodule.dataset, "torch_threads": torch.get_num_threads()}
        try:
            self.last_likelihood_keys = set()
            if spec.likelihood:
                likelihood = self._likelihood(model, datamodule, likelihood_split or spec.likelihood_split,
                                              max_likelihood_examples or spec.max_likelihood_examples, rank, world)
                result.update(likelihood)
                self.last_likelihood_keys = set(likelihood)
            if spec.quality or spec.timing:
                result["sampling_seed"] = self._sampling_seed
                result.update(self._samples(model, datamodule, rank, world))
            if spec.straightness_paths and model.sampling_ode() is not None:
                result.update(self._straightness(model, rank, world))
        finally:
            model.train(was_training)
        return result

    # ---- likelihood ----
    def _likelihood(self, model, datamodule, split: str, limit: int | None, rank: int, world: int) -> dict:
        data = datamodule.split(split)
        data = data[:limit] if limit else data
        batch_size = self.spec.likelihood_batch_size
        kinds = sorted(model.likelihood_estimators())
        traits = {kind: likelihood_traits(model, kind) for kind in kinds}
        discrete = datamodule.is_discrete
        iw_kinds = tuple(k for k in kinds if traits[k].importance_weightable
                         and (traits[k].unbiased_density or self.spec.iw_estimates)) if discrete else ()
        dequantisation = None
        if iw_kinds and self.spec.iw_samples > 1:
            dequantisation = Dequantisation(getattr(datamodule.splits, split)[:len(data)], datamodule.levels,
                                            self.spec.iw_samples, iw_kinds)
        passes = 1 + (self.spec.iw_samples - 1 if dequantisation is not None else 0)
        # This rank's examples (split_likelihood deals batches round-robin) times its passes: what its bar counts to.
        share = passes * sum(min(batch_size, len(data) - i)
                             for i in range(rank * batch_size, len(data), world * batch_size))
        with self._bar(share, f"likelihood ({split})", rank, world) as bar:
            outcome = split_likelihood(model, data, batch_size, self.spec.seed, rank, world,
                                       extras=self.spec.extras, progress=bar, dequantisation=dequantisation)
        if not outcome.nll:
            return {}
        result: dict = {"likelihood_split": split, "likelihood_examples": outcome.examples, **outcome.extras}
        true_log_p = datamodule.true_log_density(data[: outcome.examples])
        entropy = None if true_log_p is None else float(-true_log_p.double().mean())
        if entropy is not None:
            result["true_entropy_nats"] = entropy
        candidates = []  # (bpd, key, label) of the upper bounds on the discrete NLL
        for kind, nll in outcome.nll.items():
            result[f"nll_{kind}"] = nll
            result[f"likelihood_label_{kind}"] = label(traits[kind], discrete)
            result[f"nll_upper_bound_{kind}"] = is_upper_bound(traits[kind])
            if discrete:
                result[f"bpd_{kind}"] = float(datamodule.bits_per_dim(nll))
                candidates.append((result[f"bpd_{kind}"], f"bpd_{kind}", result[f"likelihood_label_{kind}"]))
            if entropy is not None:
                result[f"nll_gap_{kind}"] = nll - entropy
        for kind, nll in outcome.iw_nll.items():
            bound = is_upper_bound(traits[kind], importance_weighted=True)
            result.update({f"nll_iw_{kind}": nll, f"bpd_iw_{kind}": float(datamodule.bits_per_dim(nll)),
                           f"likelihood_label_iw_{kind}": iw_label(traits[kind], self.spec.iw_samples),
                           f"nll_upper_bound_iw_{kind}": bound, "iw_samples": self.spec.iw_samples})
            result[f"bpd_iw_gain_{kind}"] = result[f"bpd_{kind}"] - result[f"bpd_iw_{kind}"]
            if bound:
                candidates.append((result[f"bpd_iw_{kind}"], f"bpd_iw_{kind}", result[f"likelihood_label_iw_{kind}"]))
        candidates = [c for c in candidates if result[c[1].replace("bpd_", "nll_upper_bound_", 1)]]
        if candidates:
            bpd, key, text = min(candidates)
            result.update(nll_discrete=result[key.replace("bpd_", "nll_", 1)], bpd_discrete=bpd,
                          likelihood_label_discrete=text, likelihood_source_discrete=key)
        return result

    # ---- samples: cost and quality ----
    def _requested_labels(self, model, datamodule) -> Tensor | None:
        """The classes the samples are drawn for: ``(n_samples,)`` for a class-conditional model on labelled image
        data with ``spec.class_metrics``, else None (the model's own draw, e.g. uniform classes)."""
        conditional = getattr(model, "is_conditional", False)
        if not (conditional and self.spec.class_metrics and len(datamodule.data_shape) == 3):
            return None
        return requested_classes(self.spec.n_samples, model.num_classes)

    def _draw(self, model, seed: int, labels, guidance: float, rank: int, world: int, cost=None,
              description: str = "sampling", options: dict | None = None):
        """This rank's chunks of ``spec.n_samples`` samples drawn with ``seed`` (see :func:`generate_chunks`);
        ``options``: further keyword arguments of ``model.sample`` (a sampling variant)."""
        spec = self.spec
        share = sum(length for _, length in rank_chunks(spec.n_samples, spec.sample_batch_size, rank, world))
        with self._bar(share, description, rank, world) as bar:
            return generate_chunks(model, spec.n_samples, spec.sample_batch_size, seed, rank, world, cost,
                                   progress=bar, labels=labels, guidance=guidance, options=options)

    def _samples(self, model, datamodule, rank: int, world: int) -> dict:
        spec = self.spec
        labels = self._requested_labels(model, datamodule)
        conditional = getattr(model, "is_conditional", False)
        # Guidance belongs to conditional models; unconditional ones draw as always.
        guidance = spec.guidance if conditional else 1.0
        if spec.timing:
            warm_up(model, min(spec.sample_batch_size, 16), labels, guidance)
        cost = SamplingCost()
        chunks = self._draw(model, self._sampling_seed, labels, guidance, rank, world, cost)
        self.last_rank_samples = sum(len(x) for _, x in chunks)
        self.last_labels = labels
        result: dict = {"guidance": guidance} if conditional else {}
        if getattr(model, "sample_mode", None) is not None:
            result["sample_mode"] = model.sample_mode
        if spec.timing:
            total = cost.reduced(model.device)
            result.update(sample_batch_size=spec.sample_batch_size, ms_per_sample=1000 * total.sec_per_sample)
            if total.nfe_per_sample is not None:
                result["nfe_per_sample"] = total.nfe_per_sample
        if not spec.quality:
            self.last_samples = None
            return result
        image = len(datamodule.data_shape) == 3
        if image:
            result.update(self._image_quality(chunks, datamodule, model.device, rank, world,
                                              labels if spec.class_metrics else None))
        else:
            result.update(self._point_quality(gather_chunks(chunks), datamodule))
        samples = self.last_samples
        if image and getattr(model, "sample_mode", "sample") != "sample":
            with model.sampling_mode("sample"):
                drawn = self._draw(model, self._sampling_seed, labels, guidance, rank, world,
                                   description="sampling (true draws)")
            metrics = self._image_metrics(drawn, datamodule, model.device, rank, world)
            result.update({f"{key}_true_draws": metrics[key] for key in IMAGE_SAMPLING_STD_METRICS})
        if spec.sampling_std_draws:
            result.update(self._sampling_std(model, datamodule, result, labels, guidance, rank, world))
        if spec.extras:
            result.update(self._variant_quality(model, datamodule, rank, world, labels, guidance))
        self.last_samples = samples
        return result

    def _variant_quality(self, model, datamodule, rank: int, world: int, labels: Tensor | None,
                         guidance: float) -> dict:
        """FID (images) or energy distance (2D) of a draw with the same sampling seed under each of the model's
        ``sampling_variants``, keyed by the variant's measured NFE; the evaluated samples stay the default's."""
        result, image = {}, len(datamodule.data_shape) == 3
        for options in model.sampling_variants():
            cost = SamplingCost()
            chunks = self._draw(model, self._sampling_seed, labels, guidance, rank, world, cost,
                                description=f"sampling ({options})", options=options)
            nfe = cost.reduced(model.device).nfe_per_sample
            if nfe is None:
                raise ValueError(f"{type(model).__name__}.sampling_variants() gave {options}, but sample() did not "
                                 f"report its NFE (set last_sample_nfe); the variant's quality is keyed by it.")
            if image:
                result[f"fid_nfe{nfe:.0f}"] = self._image_metrics(chunks, datamodule, model.device, rank, world)["fid"]
            else:
                result[f"energy_distance_nfe{nfe:.0f}"] = point_metrics(
                    gather_chunks(chunks), self._current_point_reference, datamodule.dataset,
                    self.spec.pr_k)["energy_distance"]
        return result

    def _sampling_std(self, model, datamodule, first: dict, labels, guidance: float, rank: int, world: int) -> dict:
        """``<metric>_sampling_std``: the sample std of the cheap metrics over the main sample set and
        ``spec.sampling_std_draws`` more, drawn with sampling seeds ``sampling_seed + 1, + 2, ...``."""
        image = len(datamodule.data_shape) == 3
        names = IMAGE_SAMPLING_STD_METRICS if image else SAMPLING_STD_METRICS
        values = {key: [first[key]] for key in names if key in first}
        for extra in range(1, self.spec.sampling_std_draws + 1):
            chunks = self._draw(model, self._sampling_seed + extra, labels, guidance, rank, world,
                                description=f"sampling (noise set {extra})")
            if image:
                metrics = self._image_metrics(chunks, datamodule, model.device, rank, world)
            else:
                metrics = point_metrics(gather_chunks(chunks), self._current_point_reference, datamodule.dataset,
                                        self.spec.pr_k)
            for key in values:
                values[key].append(metrics[key])
        return {"sampling_std_sets": 1 + self.spec.sampling_std_draws,
                **{f"{key}_sampling_std": mean_and_std(v)[1] for key, v in values.items()}}

    def _builtin_classifier(self) -> bool:
        return self.spec.feature_extractor == "classifier" and self.spec.feature_extractor_weights_path is None

    def _features(self, chunks, datamodule, device, rank: int, world: int, description: str) -> Tensor:
        """Features of the samples in ``chunks`` (each rank featurises its own), gathered in chunk order."""
        extractor = self._extractor.to(device)
        with self._bar(sum(len(x) for _, x in chunks), description, rank, world) as bar:
            fake_chunks = [(i, extract_features(extractor, datamodule.to_pixels(x), self.spec.sample_batch_size,
                                                device, progress=bar)) for i, x in chunks]
        return gather_chunks(fake_chunks)

    def _image_metrics(self, chunks, datamodule, device, rank: int, world: int) -> dict:
        """FID, KID and precision/recall of another sample set against the reference (extractor built)."""
        spec = self.spec
        reference, _, _ = self._reference_and_floor(datamodule, device, rank, world)
        fake = self._features(chunks, datamodule, device, rank, world, "features (samples)")
        kid, _ = kernel_distance(reference, fake, spec.kid_subsets, seed=spec.seed)
        precision, recall = precision_recall(reference, fake, spec.pr_k)
        return {"fid": frechet_distance(reference, fake), "kid": kid, "precision": precision, "recall": recall}

    def _image_quality(self, chunks, datamodule, device, rank: int, world: int, labels: Tensor | None = None) -> dict:
        spec = self.spec
        if self._builtin_classifier() and spec.reference_split != "test":
            raise ValueError(
                f"reference_split: {spec.reference_split} with the built-in feature classifier of "
                f"'{datamodule.dataset}': it was trained on non-test examples, which the {spec.reference_split} "
                f"split of a data seed contains, so the reference would not be images it never saw. Use "
                f"reference_split: test (the same split for every data seed), feature_extractor: inception, or a "
                f"classifier of your own (feature_extractor_weights_path).")
        if self._extractor is None:
            self._extractor = build_extractor(spec.feature_extractor, datamodule.dataset,
                                              spec.feature_extractor_weights_path, self.cache_dir, rank, device)
        extractor = self._extractor
        reference, floor_all, floor_set_ = self._reference_and_floor(datamodule, device, rank, world)
        floor = floor_all[: spec.n_samples]
        fake = self._features(chunks, datamodule, device, rank, world, "features (samples)")
        self.last_samples = gather_chunks(chunks)
        kid, kid_std = kernel_distance(reference, fake, spec.kid_subsets, seed=spec.seed)
        kid_floor, _ = kernel_distance(reference, floor, spec.kid_subsets, seed=spec.seed)
        precision, recall = precision_recall(reference, fake, spec.pr_k)
        extra_fids = {f"fid_n{n}": frechet_distance(reference, fake[:n]) for n in spec.fid_sample_counts or []
                      if 2 <= n < len(fake)}
        if len(floor) < len(fake):  # the floor set holds fewer images than were sampled: the FID at its n too
            extra_fids["fid_at_floor_n"] = frechet_distance(reference, fake[:len(floor)])
        if labels is not None:
            extra_fids.update(self._class_metrics(datamodule, labels[:len(fake)], fake, reference, floor_all,
                                                  floor_set_.labels, device, rank))
        return {**extra_fids, "extractor": f"{extractor.name}-{extractor.fingerprint}",
                "reference_split": spec.reference_split, "floor_split": floor_set_.name,
                "n_reference": len(reference), "n_quality": len(fake), "n_floor": len(floor),
                "fid": frechet_distance(reference, fake), "fid_floor": frechet_distance(reference, floor),
                "kid": kid, "kid_std": kid_std, "kid_floor": kid_floor, "kid_subsets": spec.kid_subsets,
                "kid_subset_size": kid_subset_size(len(reference), len(fake)),
                "precision": precision, "recall": recall}

    # ---- class-conditional samples ----
    def _class_logits(self, features: Tensor, pixels_of, datamodule, device, rank: int) -> Tensor:
        """The feature classifier's logits ``(N, K)``: from the FID features when the FID extractor is that
        classifier (the same network, no second pass), else from ``pixels_of()`` through the classifier."""
        classifier = getattr(self._extractor, "classifier", None)
        if classifier is not None:
            with torch.inference_mode():
                return classifier.head(features.to(device, next(classifier.parameters()).dtype)).cpu()
        if self._label_classifier is None:
            self._label_classifier = build_extractor("classifier", datamodule.dataset, None, self.cache_dir, rank,
                                                     device).classifier
        classifier = self._label_classifier.to(device)
        pixels = pixels_of()
        with torch.inference_mode():
            return torch.cat([classifier(pixels[i:i + self.spec.sample_batch_size].to(device)).cpu()
                              for i in range(0, len(pixels), self.spec.sample_batch_size)])

    def _class_metrics(self, datamodule, labels: Tensor, fake: Tensor, reference: Tensor, floor_all: Tensor,
                       floor_all_labels: Tensor, device, rank: int) -> dict:
        """Accuracy of the requested classes and class-conditional FID/KID (with their real-vs-real floors), from
        the features of the samples (``fake``, drawn for ``labels``) and of the real sets. The floor takes, per
        class, as many real examples of the floor set as there are samples of that class (its first ones)."""
        spec = self.spec
        reference_labels = datamodule.split_labels(spec.reference_split)
        counts = torch.bincount(labels, minlength=int(floor_all_labels.max()) + 1)
        chosen = torch.cat([(floor_all_labels == c).nonzero().squeeze(1)[:int(k)] for c, k in enumerate(counts)
                            if k > 0])
        floor, floor_labels = floor_all[chosen], floor_all_labels[chosen]
        samples = self.last_samples
        fake_logits = self._class_logits(fake, lambda: datamodule.to_pixels(samples), datamodule, device, rank)
        real_logits = self._class_logits(reference, lambda: real_pixels(datamodule, spec.reference_split),
                                         datamodule, device, rank)
        model_distances = class_conditional_distances(reference, reference_labels, fake, labels, spec.kid_subsets,
                                                      spec.seed)
        floor_distances = class_conditional_distances(reference, reference_labels, floor, floor_labels,
                                                      spec.kid_subsets, spec.seed)
        return {"class_accuracy": class_accuracy(fake_logits, labels),
                "class_accuracy_real": class_accuracy(real_logits, reference_labels),
                "class_fid": model_distances.fid, "class_fid_floor": floor_distances.fid,
                "class_kid": model_distances.kid, "class_kid_floor": floor_distances.kid,
                "n_quality_per_class": int(counts[counts > 0].min())}

    def _reference_and_floor(self, datamodule, device, rank: int, world: int) -> tuple[Tensor, Tensor, FloorSet]:
        """The reference split's features, the whole floor set's (the unconditional floor uses its first
        n_samples, the class-conditional one the first examples of each class) and the floor set itself."""
        key = (datamodule.dataset, datamodule.seed, self.spec.reference_split)
        if key not in self._reference:
            bar = lambda name: lambda n: self._bar(n, f"features ({name})", rank, world)  # noqa: E731
            reference = reference_features(self._extractor, datamodule, self.spec.reference_split, self.cache_dir,
                                           rank, world, device, self.spec.sample_batch_size,
                                           progress=bar(self.spec.reference_split))
            floor = floor_set(datamodule, self.spec.reference_split, self._builtin_classifier())
            features = floor_features(self._extractor, datamodule, floor, self.cache_dir, rank, world, device,
                                      self.spec.sample_batch_size, progress=bar(floor.name))
            self._reference[key] = (reference, features, floor)
        return self._reference[key]

    def point_reference(self, datamodule, n: int) -> PointReference:
        """The reference of ``n`` samples of a 2D dataset with its null (data only: computed once, then read from
        the cache; the benchmark computes it before its parallel runs start)."""
        split = self.spec.reference_split
        return point_reference(datamodule, split, floor_split_for(split), n, self.spec.null_draws, self.cache_dir)

    def refresh_nulls(self, row: dict, datamodule) -> dict:
        """A finished 2D run's row, and each point of its curve, with this evaluator's real-vs-real null (data only:
        :func:`lightning_flows.evaluation.point_quality.refresh_nulls`); rows without a null come back unchanged."""
        split = row.get("reference_split", self.spec.reference_split)
        draws = self.spec.null_draws
        out = refresh_nulls(row, datamodule, split, draws, self.cache_dir)
        if isinstance(row.get("curve"), list):
            out["curve"] = [refresh_nulls(point, datamodule, split, draws, self.cache_dir) for point in row["curve"]]
        return out

    def _point_quality(self, samples: Tensor, datamodule) -> dict:
        """Sample quality of 2D data (:mod:`lightning_flows.evaluation.point_quality`) with each metric's null."""
        spec = self.spec
        self.last_samples = samples
        n = len(samples)
        floor_split = floor_split_for(spec.reference_split)
        key = (datamodule.dataset, datamodule.seed, spec.reference_split, n)
        if key not in self._point_reference:  # real data only: the same for every model and sampler
            ref = self.point_reference(datamodule, n)
            floor = datamodule.split(floor_split)[:n]
            self._point_reference[key] = ref
            self._point_floor[key] = float(energy_distance(floor, ref.reference))
        ref = self._current_point_reference = self._point_reference[key]
        metrics = point_metrics(samples, ref, datamodule.dataset, spec.pr_k)
        return {"reference_split": spec.reference_split, "n_quality": n, "n_reference": len(ref.reference),
                **metrics, "energy_distance_floor": self._point_floor[key], "mmd_bandwidth": ref.bandwidth,
                "mmd_bandwidth_source": ref.bandwidth_source, **null_fields(metrics, ref),
                "null_draws": ref.null_draws, "null_source": ref.null_source}

    # ---- paths of ODE samplers ----
    def _straightness(self, model, rank: int, world: int) -> dict:
        """Straightness of ``straightness_paths`` paths of the model's sampling ODE, each from its own noise (chunk
        ``i`` seeded like the samples' chunk ``i``), integrated by midpoint steps and its field read at every grid
        time; per-path values are gathered in chunk order, so any number of ranks gives the single-process mean."""
        spec = self.spec
        field, t0, t1 = model.sampling_ode()
        solver = SolverConfig("midpoint", steps=spec.straightness_steps, max_nfe=2 * spec.straightness_steps)
        times = torch.linspace(t0, t1, spec.straightness_steps + 1, device=model.device)
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        chunks = []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for index, length in rank_chunks(spec.straightness_paths, spec.sample_batch_size, rank, world):
                torch.manual_seed(chunk_seed(self._sampling_seed, index))
                x0 = torch.randn(length, *model.data_shape, device=model.device)
                states = integrate(field, x0, solver, times=times).states  # (T, n, *shape)
                velocities = torch.stack([field(x, t) for x, t in zip(states, times)])
                per_path = path_straightness(velocities, times)
                chunks.append((index, torch.stack([per_path.straightness, per_path.kinetic_energy], 1).cpu()))
        straightness, kinetic = gather_chunks(chunks).mean(0).tolist()
        return {"straightness": straightness, "straightness_rel": straightness / kinetic if kinetic > 0 else 0.0,
                "straightness_paths": spec.straightness_paths}

    @contextmanager
    def _bar(self, total: int, description: str, rank: int, world: int):
        """A progress bar in the style of Lightning's (rank zero only; ``spec.progress``) over this rank's
        ``total`` examples. Its postfix counts the ODE evaluations made so far, so a long solve over one
        batch (an exact likelihood, a CNF's samples) is seen advancing too."""
        disabled = not self.spec.progress or rank != 0
        if world > 1:
            description = f"{description}, rank 0 of {world}"
        bar = Tqdm(total=total, desc=description, unit="ex", leave=False, dynamic_ncols=True, file=sys.stdout,
                   bar_format=TQDMProgressBar.BAR_FORMAT, disable=disabled)
        if disabled:
            with bar:
                yield bar
            return
        evaluations, last_shown = 0, time.monotonic()

        def count_evaluation() -> None:
            nonlocal evaluations, last_shown
            evaluations += 1
            if time.monotonic() - last_shown >= 0.5:
                last_shown = time.monotonic()
                bar.set_postfix_str(f"nfe={evaluations}")

        with bar, observe_field_evaluations(count_evaluation):
            yield bar


# Counts and settings that label other numbers; kept in results, not logged as metrics.
LABEL_KEYS = ("n_reference", "n_quality", "n_floor", "sample_batch_size", "num_modes", "straightness_paths",
              "guidance", "n_quality_per_class", "sampling_seed", "torch_threads", "iw_samples", "kid_subsets",
              "kid_subset_size", "null_draws", "sampling_std_sets", "mmd_bandwidth")


def metric_names(result: dict) -> dict[str, str]:
    """Key -> the name a logger records it under: FID/KID carry their extractor, reference split and n
    (so that numbers from different settings are never compared by accident)."""
    names = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key in LABEL_KEYS:
            continue
        if key in ("fid", "kid", "kid_std", "class_fid", "class_kid", "class_accuracy") or key.startswith("fid_nfe"):
            names[key] = f"{key}_{result['extractor'].split('-')[0]}_{result['reference_split']}_n{result['n_quality']}"
            if result.get("guidance", 1.0) != 1.0:  # guided samples are another model's: never mix them up
                names[key] += f"_w{result['guidance']:g}"
        elif key in ("fid_floor", "kid_floor", "class_fid_floor", "class_kid_floor"):
            names[key] = f"{key}_{result['extractor'].split('-')[0]}_{result['reference_split']}_n{result['n_floor']}"
        else:
            names[key] = key
    return names
