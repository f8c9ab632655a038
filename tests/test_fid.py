"""Sample-quality features and distances: FID/KID through torchmetrics on precomputed features, the
inception path offline, the reference-feature cache (keyed, checked, never stale), the FID callback's
names, world-size-independent sample generation and deterministic classifier training."""

from __future__ import annotations

import math
from unittest import mock

import lightning as L
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_flows.callbacks import FIDCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation.reference import (extract_features, real_pixels, reference_cache_path,
                                                  reference_features)
from lightning_flows.evaluation.samples import gather_chunks, generate_chunks, rank_chunks
from lightning_flows.metrics import frechet_distance, kernel_distance
from lightning_flows.metrics.classifier import state_fingerprint, train_classifier
from lightning_flows.metrics.features import InceptionFeatures, build_feature_extractor
from test_eval_helpers import fitted_gaussian, random_classifier_file


@pytest.fixture(scope="module")
def digits():
    dm = GenerativeDataModule("digits", batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def classifier_extractor(tmp_path_factory):
    path = random_classifier_file(tmp_path_factory.mktemp("clf") / "digits.pt")
    return build_feature_extractor("classifier", weights_path=path)


def features(extractor, pixels):
    return extract_features(extractor, pixels, 500, torch.device("cpu"))


def test_fid_and_kid_of_a_set_against_itself_are_zero_and_grow_with_noise(digits, classifier_extractor):
    images = real_pixels(digits, "train")[:600]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    sigmas = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    real = features(classifier_extractor, images)
    fids = [frechet_distance(real, features(classifier_extractor, images + s * noise)) for s in sigmas]
    kids = [kernel_distance(real, features(classifier_extractor, images + s * noise), subsets=5)[0] for s in sigmas]
    assert all(math.isfinite(f) for f in fids)
    assert abs(fids[0]) < 1e-6 * fids[1], fids
    assert all(a < b for a, b in zip(fids[1:], fids[2:])), f"FID not increasing with noise: {fids}"
    assert all(a < b for a, b in zip(kids[1:], kids[2:])), f"KID not increasing with noise: {kids}"


def test_fid_on_precomputed_features_equals_torchmetrics_running_the_extractor(digits, classifier_extractor):
    """Feeding features extracted once gives the FID torchmetrics computes from the images itself."""
    real, fake = real_pixels(digits, "test"), real_pixels(digits, "train")[:300].flip(-1)
    direct = FrechetInceptionDistance(feature=classifier_extractor, normalize=True, sync_on_compute=False)
    direct.update(real[:100], real=True)
    direct.update(real[100:], real=True)
    direct.update(fake, real=False)
    ours = frechet_distance(features(classifier_extractor, real), features(classifier_extractor, fake))
    # features pass through float32 once (the cached representation): agreement to float32 precision
    assert ours == pytest.approx(float(direct.compute()), rel=1e-4)


def test_kid_is_unbiased_near_zero_for_two_samples_of_one_distribution():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=gen), torch.randn(400, 8, generator=gen)
    same, _ = kernel_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_distance(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 0.1 * shifted
    assert kernel_distance(a, b, subsets=20, subset_size=200) == kernel_distance(a, b, subsets=20, subset_size=200)


def test_reference_features_are_cached_keyed_and_recomputed_when_stale(tmp_path, digits, classifier_extractor):
    cpu = torch.device("cpu")
    first = reference_features(classifier_extractor, digits, "test", tmp_path, 0, 1, cpu)
    path = reference_cache_path(tmp_path, digits, "test", classifier_extractor)
    assert path.is_file() and first.shape == (180, 64)
    assert torch.equal(reference_features(classifier_extractor, digits, "test", tmp_path, 0, 1, cpu), first)
    # The key is the split's content: every data seed shares the fixed test split (so its features are
    # computed once), while another seed's training split is other images and so another file.
    other = GenerativeDataModule("digits", seed=1)
    assert reference_cache_path(tmp_path, other, "test", classifier_extractor) == path
    assert (reference_cache_path(tmp_path, other, "train", classifier_extractor)
            != reference_cache_path(tmp_path, digits, "train", classifier_extractor))
    # A truncated file is recomputed (with a warning), not trusted.
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="stale or unreadable"):
        again = reference_features(classifier_extractor, digits, "test", tmp_path, 0, 1, cpu)
    assert torch.equal(again, first)
    # A file whose recorded key or size disagrees with its name is recomputed too.
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "features": payload["features"][:10]}, path)
    with pytest.warns(UserWarning, match="stale or unreadable"):
        reference_features(classifier_extractor, digits, "test", tmp_path, 0, 1, cpu)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict of torch-fidelity's Inception-v3 at random init: the offline stand-in for the
    real weights (built without the download by skipping the load)."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    with mock.patch.object(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None), \
            mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: {}):
        torch.manual_seed(0)
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_path_runs_offline_and_gives_a_finite_fid(random_inception_weights, digits):
    extractor = build_feature_extractor("inception", weights_path=random_inception_weights)
    assert extractor.num_features == 2048
    grey = real_pixels(digits, "test")[:3]
    feats = extractor(grey)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float64 and feats.isfinite().all()
    # grey repeated to 3 channels and rounded to uint8, then torch-fidelity's own (non-antialiased)
    # resize and network: the reference FID pipeline
    uint8 = (grey.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    assert torch.equal(feats, extractor.network(uint8)[0].double())
    fid = frechet_distance(feats.float(), features(extractor, real_pixels(digits, "train")[:3]))
    assert math.isfinite(fid) and fid >= -1e-6


def test_inception_without_weights_offline_names_the_fix():
    with mock.patch("torch.hub.load_state_dict_from_url", side_effect=OSError("no network")):
        with pytest.raises(RuntimeError, match="feature_extractor_weights_path"):
            InceptionFeatures(None)


def test_generation_is_the_same_set_for_any_number_of_ranks(digits):
    model = fitted_gaussian(digits.split("train"))
    n, chunk = 130, 50
    single = gather_chunks(generate_chunks(model, n, chunk, seed=3, rank=0, world=1))
    for world in (2, 3):
        shares = [generate_chunks(model, n, chunk, seed=3, rank=r, world=world) for r in range(world)]
        assert [[i for i, _ in share] for share in shares] == [[i for i, _ in rank_chunks(n, chunk, r, world)]
                                                               for r in range(world)]
        union = gather_chunks([c for share in shares for c in share])  # what the all-gather reassembles
        assert torch.equal(union, single)
        assert sum(len(x) for share in shares for _, x in share) == n


def test_fid_callback_logs_labelled_names_floor_and_cost(tmp_path, digits):
    clf = random_classifier_file(tmp_path / "clf.pt")
    model = fitted_gaussian(digits.split("train"))

    def run():
        callback = FIDCallback(n=120, chunk_size=60, feature_extractor_weights_path=str(clf), cache_dir=str(tmp_path),
                               progress=False)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
        trainer.test(model, datamodule=digits, verbose=False)
        return callback.last_logged, dict(trainer.callback_metrics)

    first, metrics = run()
    assert {"test/fid_classifier_test_n120", "test/fid_floor_classifier_test_n120", "test/kid_classifier_test_n120",
            "test/kid_floor_classifier_test_n120", "test/precision", "test/recall", "test/nfe_per_sample",
            "test/ms_per_sample"} <= set(first)
    assert not any("bpd" in name for name in first)  # quality only
    assert set(first) <= set(metrics)
    assert first["test/nfe_per_sample"] == 1.0 and first["test/ms_per_sample"] > 0
    assert first["test/fid_classifier_test_n120"] > first["test/fid_floor_classifier_test_n120"] > 0
    cached = sorted(p.name for p in (tmp_path / "reference_features").iterdir())
    assert len(cached) == 2 and any(name.startswith("digits_test_") for name in cached)  # reference + floor split
    again, _ = run()  # from the cache: same numbers
    assert again["test/fid_classifier_test_n120"] == pytest.approx(first["test/fid_classifier_test_n120"], rel=1e-12)
    assert again["test/fid_floor_classifier_test_n120"] == first["test/fid_floor_classifier_test_n120"]


def test_fid_callback_rejects_bad_arguments_and_fid_needs_images():
    with pytest.raises(ValueError, match="feature_extractor"):
        FIDCallback(feature_extractor="vgg")
    with pytest.raises(ValueError, match="reference_split"):
        FIDCallback(real_split="holdout")
    with pytest.raises(ValueError, match="image dataset"):
        real_pixels(GenerativeDataModule("moons"), "test")


def test_classifier_trains_even_when_called_from_lightning_inference_mode():
    with torch.inference_mode():  # first use happens inside a validation epoch
        model, _ = train_classifier("digits", epochs=1, max_batches=2, log=lambda message: None)
    assert not any(p.is_inference() for p in model.parameters())


def test_classifier_training_is_deterministic():
    def train():
        return train_classifier("digits", epochs=2, max_batches=5, log=lambda message: None)

    (first, acc1), (second, acc2) = train(), train()
    assert state_fingerprint(first) == state_fingerprint(second) and acc1 == acc2
    assert state_fingerprint(first) != state_fingerprint(train_classifier("digits", epochs=1, max_batches=5,
                                                                          log=lambda message: None)[0])


def test_classifier_weights_do_not_depend_on_the_callers_thread_count():
    # The cached classifier defines every digits FID: a machine with more cores (or a benchmark with fewer
    # --jobs) must train the same weights, and the caller's thread count must come back afterwards.
    before = torch.get_num_threads()
    fingerprints = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            model, _ = train_classifier("digits", epochs=1, max_batches=8, log=lambda message: None)
            assert torch.get_num_threads() == threads
            fingerprints.append(state_fingerprint(model))
    finally:
        torch.set_num_threads(before)
    assert fingerprints[0] == fingerprints[1]
