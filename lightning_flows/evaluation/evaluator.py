"""The one evaluator: every number of the callbacks, ``lightning-flows test`` and the benchmark.

``Evaluator(spec).evaluate(model, datamodule)`` returns one flat dict (short, stable keys; see
:data:`KEYS`), with the labels a number needs to be read correctly (likelihood kind, extractor,
sample counts, which weights). It draws the samples once and feeds every quality metric and the
sampling-cost timer from them; under DDP each rank draws and featurises its share, and every rank
ends with the same values (identical to a single process on the same samples).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar
from torch import Tensor

from lightning_flows.data.toy2d import TOY_MODES
from lightning_flows.evaluation.likelihood import split_likelihood
from lightning_flows.evaluation.reference import build_extractor, extract_features, real_pixels, reference_features
from lightning_flows.evaluation.samples import chunk_seed, gather_chunks, generate_chunks, rank_chunks, warm_up
from lightning_flows.evaluation.spec import EvaluationSpec, floor_split_for
from lightning_flows.metrics import (class_accuracy, class_conditional_distances, energy_distance, frechet_distance,
                                     kernel_distance, mode_coverage, path_straightness, precision_recall,
                                     requested_classes)
from lightning_flows.metrics.classifier import default_cache_dir
from lightning_flows.metrics.distributed import rank_and_world
from lightning_flows.metrics.sampling_cost import SamplingCost
from lightning_flows.ode import SolverConfig, integrate
from lightning_flows.ode.solve import observe_field_evaluations

# What each key of a result means (the table, results.json and loggers use these names).
KEYS = {
    "weights": "which weights were evaluated: 'ema' (the run's average, what `sample` uses) or 'training'",
    "nll_<kind>": "mean negative log-likelihood, nats per example in model space; kind = exact | bound | estimate "
                  "(class-conditional flow matching / diffusion: of their null-class, i.e. unconditional, field)",
    "bpd_<kind>": "the same NLL as bits per dimension of the discrete data (through metrics.bits_per_dim)",
    "nll_gap_<kind>": "NLL minus the data's true entropy (toy densities with a known density); 0 is the limit",
    "true_entropy_nats": "the data's entropy on the same examples, -mean log p_data",
    "likelihood_examples": "examples the NLL averages over",
    "posterior_gap_nats": "VAE: IWAE_K bound minus ELBO, nats per example (the lecture's posterior gap); not "
                          "reported for a conditional VAE, whose likelihood here is the marginal over classes",
    "nfe_per_sample": "network evaluations per generated sample",
    "ms_per_sample": "device-milliseconds per sample after one warm-up call, at sample_batch_size per call",
    "fid / fid_floor": "FID of the samples / of another real split at the same n, against the reference split",
    "fid_n<n>": "FID of the first n samples (EvaluationSpec.fid_sample_counts)",
    "fid_nfe<k> / energy_distance_nfe<k>": "the same quality metric for another sampling setting of the model at k "
                                           "NFE/sample (GenerativeModel.sampling_variants, e.g. MeanFlow's 2 steps)",
    "kid / kid_std / kid_floor": "unbiased KID (mean and std over subsets) and its real-vs-real floor",
    "precision / recall": "k-NN precision and recall in feature space (2D data: the coordinates)",
    "energy_distance / energy_distance_floor": "2D data: energy distance to the reference split, and its floor",
    "modes_hit / mode_kl / good_fraction": "8gaussians: modes receiving >= 1% of samples, KL(mode histogram || "
                                           "uniform) in nats, fraction of samples within 3 std of a mode",
    "straightness / straightness_rel": "ODE samplers: mean Liu et al. straightness S of straightness_paths paths "
                                       "from noise (0 = straight at constant speed), and S / kinetic energy in [0, 1]",
    "guidance": "class-conditional models: the classifier-free guidance weight w the samples were drawn with",
    "class_accuracy": "class-conditional models: fraction of samples the feature classifier assigns to the class "
                      "they were drawn for (equal counts per class; 1.0 = every class as asked, ~1/K = label ignored)",
    "class_accuracy_real": "the same classifier's accuracy on the real reference split (the attainable ceiling)",
    "class_fid / class_fid_floor": "class-conditional FID: per class, the reference split's examples of that class "
                                   "vs the samples drawn for it (floor: another real split's), averaged over classes",
    "class_kid / class_kid_floor": "class-conditional KID, averaged over classes the same way",
}


class Evaluator:
    """Measure a model on a DataModule as ``spec`` says. Holds the feature extractor and the reference
    features between calls, so a callback that evaluates every few epochs pays for them once."""

    def __init__(self, spec: EvaluationSpec | None = None):
        self.spec = spec or EvaluationSpec()
        self.cache_dir = Path(self.spec.cache_dir).expanduser() if self.spec.cache_dir else default_cache_dir()
        self._extractor = None
        self._label_classifier = None  # the feature classifier whose labels score conditional samples
        self._reference: dict[tuple, tuple[Tensor, Tensor]] = {}  # (dataset, split) -> (reference, floor)
        self._point_floor: dict[tuple, float] = {}  # (dataset, seed, split, n) -> energy distance of the floor
        self.last_samples: Tensor | None = None  # the evaluated samples, model space, every rank
        self.last_rank_samples = 0  # how many of them this rank drew
        self.last_labels: Tensor | None = None  # the classes they were drawn for (class-conditional models)

    # ---- the entry point ----
    def evaluate(self, model, datamodule, weights: str = "training", likelihood_split: str | None = None,
                 max_likelihood_examples: int | None = None) -> dict:
        """All of ``spec``'s numbers for ``model`` on ``datamodule``; a collective under DDP.

        ``weights`` is recorded as given (see :mod:`lightning_flows.evaluation.weights`);
        ``likelihood_split`` / ``max_likelihood_examples`` override the spec (callbacks use the
        stage's split and honour ``limit_val_batches``).
        """
        spec = self.spec
        datamodule.setup()
        rank, world = rank_and_world()
        was_training = model.training
        model.eval()
        result: dict = {"weights": weights, "dataset": datamodule.dataset}
        try:
            if spec.likelihood:
                result.update(self._likelihood(model, datamodule, likelihood_split or spec.likelihood_split,
                                               max_likelihood_examples or spec.max_likelihood_examples,
                                               rank, world))
            if spec.quality or spec.timing:
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
        # This rank's examples (split_likelihood deals batches round-robin): what its bar counts to.
        share = sum(min(batch_size, len(data) - i) for i in range(rank * batch_size, len(data), world * batch_size))
        with self._bar(share, f"likelihood ({split})", rank, world) as bar:
            outcome = split_likelihood(model, data, batch_size, self.spec.seed, rank, world,
                                       extras=self.spec.extras, progress=bar)
        if not outcome.nll:
            return {}
        result: dict = {"likelihood_split": split, "likelihood_examples": outcome.examples, **outcome.extras}
        true_log_p = datamodule.true_log_density(data[: outcome.examples])
        entropy = None if true_log_p is None else float(-true_log_p.double().mean())
        if entropy is not None:
            result["true_entropy_nats"] = entropy
        for kind, nll in outcome.nll.items():
            result[f"nll_{kind}"] = nll
            if datamodule.is_discrete:
                result[f"bpd_{kind}"] = float(datamodule.bits_per_dim(nll))
            if entropy is not None:
                result[f"nll_gap_{kind}"] = nll - entropy
        return result

    # ---- samples: cost and quality ----
    def _requested_labels(self, model, datamodule) -> Tensor | None:
        """The classes the samples are drawn for: ``(n_samples,)`` for a class-conditional model on labelled image
        data with ``spec.class_metrics``, else None (the model's own draw, e.g. uniform classes)."""
        conditional = getattr(model, "is_conditional", False)
        if not (conditional and self.spec.class_metrics and len(datamodule.data_shape) == 3):
            return None
        return requested_classes(self.spec.n_samples, model.num_classes)

    def _samples(self, model, datamodule, rank: int, world: int) -> dict:
        spec = self.spec
        labels = self._requested_labels(model, datamodule)
        conditional = getattr(model, "is_conditional", False)
        # Guidance belongs to conditional models; unconditional ones draw as always.
        guidance = spec.guidance if conditional else 1.0
        if spec.timing:
            warm_up(model, min(spec.sample_batch_size, 16), labels, guidance)
        cost = SamplingCost()
        share = sum(length for _, length in rank_chunks(spec.n_samples, spec.sample_batch_size, rank, world))
        with self._bar(share, "sampling", rank, world) as bar:
            chunks = generate_chunks(model, spec.n_samples, spec.sample_batch_size, spec.seed, rank, world, cost,
                                     progress=bar, labels=labels, guidance=guidance)
        self.last_rank_samples = sum(len(x) for _, x in chunks)
        self.last_labels = labels
        result: dict = {"guidance": guidance} if conditional else {}
        if spec.timing:
            total = cost.reduced(model.device)
            result.update(sample_batch_size=spec.sample_batch_size, ms_per_sample=1000 * total.sec_per_sample)
            if total.nfe_per_sample is not None:
                result["nfe_per_sample"] = total.nfe_per_sample
        if not spec.quality:
            self.last_samples = None
            return result
        if len(datamodule.data_shape) == 3:
            result.update(self._image_quality(chunks, datamodule, model.device, rank, world,
                                              labels if spec.class_metrics else None))
        else:
            result.update(self._point_quality(gather_chunks(chunks), datamodule))
        if spec.extras:
            result.update(self._variant_quality(model, datamodule, rank, world, labels, guidance))
        return result

    def _variant_quality(self, model, datamodule, rank: int, world: int, labels: Tensor | None,
                         guidance: float) -> dict:
        """FID (images) or energy distance (2D) of the same samples' draw under each of the model's
        ``sampling_variants``, keyed by the variant's measured NFE; the evaluated samples stay the default's."""
        spec, result = self.spec, {}
        image = len(datamodule.data_shape) == 3
        kept = self.last_samples, self.last_rank_samples
        for options in model.sampling_variants():
            cost = SamplingCost()
            chunks = generate_chunks(model, spec.n_samples, spec.sample_batch_size, spec.seed, rank, world, cost,
                                     labels=labels, guidance=guidance, options=options)
            nfe = cost.reduced(model.device).nfe_per_sample
            if nfe is None:
                raise ValueError(f"{type(model).__name__}.sampling_variants() gave {options}, but sample() did not "
                                 f"report its NFE (set last_sample_nfe); the variant's quality is keyed by it.")
            if image:
                result[f"fid_nfe{nfe:.0f}"] = self._image_quality(chunks, datamodule, model.device, rank, world)["fid"]
            else:
                result[f"energy_distance_nfe{nfe:.0f}"] = self._point_quality(gather_chunks(chunks),
                                                                              datamodule)["energy_distance"]
        self.last_samples, self.last_rank_samples = kept
        return result

    def _image_quality(self, chunks, datamodule, device, rank: int, world: int, labels: Tensor | None = None) -> dict:
        spec = self.spec
        if self._extractor is None:
            self._extractor = build_extractor(spec.feature_extractor, datamodule.dataset,
                                              spec.feature_extractor_weights_path, self.cache_dir, rank, device)
        extractor = self._extractor.to(device)
        reference, floor_split = self._reference_and_floor(datamodule, device, rank, world)
        floor = floor_split[: spec.n_samples]
        with self._bar(sum(len(x) for _, x in chunks), "features (samples)", rank, world) as bar:
            fake_chunks = [(i, extract_features(extractor, datamodule.to_pixels(x), spec.sample_batch_size, device,
                                                progress=bar)) for i, x in chunks]
        self.last_samples = gather_chunks(chunks)
        fake = gather_chunks(fake_chunks)
        kid, kid_std = kernel_distance(reference, fake, spec.kid_subsets, seed=spec.seed)
        kid_floor, _ = kernel_distance(reference, floor, spec.kid_subsets, seed=spec.seed)
        precision, recall = precision_recall(reference, fake, spec.pr_k)
        extra_fids = {f"fid_n{n}": frechet_distance(reference, fake[:n]) for n in spec.fid_sample_counts or []
                      if 2 <= n < len(fake)}
        if labels is not None:
            extra_fids.update(self._class_metrics(datamodule, labels[:len(fake)], fake, reference, floor_split, device,
                                                  rank))
        return {**extra_fids, "extractor": f"{extractor.name}-{extractor.fingerprint}",
                "reference_split": spec.reference_split,
                "n_reference": len(reference), "n_quality": len(fake), "n_floor": len(floor),
                "fid": frechet_distance(reference, fake), "fid_floor": frechet_distance(reference, floor),
                "kid": kid, "kid_std": kid_std, "kid_floor": kid_floor, "precision": precision, "recall": recall}

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

    def _class_metrics(self, datamodule, labels: Tensor, fake: Tensor, reference: Tensor, floor_split: Tensor, device,
                       rank: int) -> dict:
        """Accuracy of the requested classes and class-conditional FID/KID (with their real-vs-real floors), from
        the features of the samples (``fake``, drawn for ``labels``) and of the real splits. The floor takes, per
        class, as many real examples of the floor split as there are samples of that class (its first ones)."""
        spec = self.spec
        reference_labels = datamodule.split_labels(spec.reference_split)
        floor_split_labels = datamodule.split_labels(floor_split_for(spec.reference_split))
        counts = torch.bincount(labels, minlength=int(floor_split_labels.max()) + 1)
        chosen = torch.cat([(floor_split_labels == c).nonzero().squeeze(1)[:int(k)] for c, k in enumerate(counts)
                            if k > 0])
        floor, floor_labels = floor_split[chosen], floor_split_labels[chosen]
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

    def _reference_and_floor(self, datamodule, device, rank: int, world: int) -> tuple[Tensor, Tensor]:
        key = (datamodule.dataset, datamodule.seed, self.spec.reference_split)
        if key not in self._reference:
            extract = lambda split: reference_features(self._extractor, datamodule, split, self.cache_dir,  # noqa
                                                       rank, world, device, self.spec.sample_batch_size,
                                                       progress=lambda n: self._bar(n, f"features ({split})", rank,
                                                                                    world))
            reference = extract(self.spec.reference_split)
            # The whole floor split: the unconditional floor uses its first n_samples, the class-conditional
            # one the first examples of each class.
            self._reference[key] = (reference, extract(floor_split_for(self.spec.reference_split)))
        return self._reference[key]

    def _point_quality(self, samples: Tensor, datamodule) -> dict:
        spec = self.spec
        self.last_samples = samples
        n = len(samples)
        reference = datamodule.split(spec.reference_split)[:n]
        floor = datamodule.split(floor_split_for(spec.reference_split))[:n]
        precision, recall = precision_recall(reference, samples.cpu(), spec.pr_k)
        floor_key = (datamodule.dataset, datamodule.seed, spec.reference_split, n)
        if floor_key not in self._point_floor:  # real data only: the same for every model and sampler
            self._point_floor[floor_key] = float(energy_distance(floor, reference))
        result = {"reference_split": spec.reference_split, "n_quality": n, "n_reference": len(reference),
                  "energy_distance": float(energy_distance(samples.cpu(), reference)),
                  "energy_distance_floor": self._point_floor[floor_key],
                  "precision": precision, "recall": recall}
        if datamodule.dataset in TOY_MODES:
            centres, std = TOY_MODES[datamodule.dataset]
            coverage = mode_coverage(samples.cpu(), centres, std)
            result.update(modes_hit=coverage.modes_hit, num_modes=coverage.num_modes,
                          mode_kl=coverage.kl_to_uniform, good_fraction=coverage.good_fraction)
        return result

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
                torch.manual_seed(chunk_seed(spec.seed, index))
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
              "guidance", "n_quality_per_class")


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
