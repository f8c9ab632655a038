"""FID: the metric's basic properties, the inception path offline, caching, the callback's names,
world-size-independent sample generation and deterministic classifier training."""

from __future__ import annotations

import math
from unittest import mock

import lightning as L
import pytest
import torch

from lightning_flows.callbacks.fid import FIDCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.metrics.classifier import state_fingerprint, train_classifier
from lightning_flows.metrics.features import InceptionFeatures, build_feature_extractor
from lightning_flows.metrics.fid import (FeatureStatistics, feature_statistics, make_fid_metric, real_pixels,
                                         set_real_statistics, update_fake)
from lightning_flows.metrics.generation import generate_rank_share, rank_chunks
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


def fid_between(extractor, real_pixels_, fake_pixels) -> float:
    metric = make_fid_metric(extractor, sync_on_compute=False)
    set_real_statistics(metric, feature_statistics(extractor, real_pixels_), owner=True)
    update_fake(metric, fake_pixels)
    return float(metric.compute())


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(digits, classifier_extractor):
    images = real_pixels(digits, "train")[:600]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=gen)
    sigmas = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    fids = [fid_between(classifier_extractor, images, images + s * noise) for s in sigmas]
    assert all(math.isfinite(f) for f in fids)
    assert abs(fids[0]) < 1e-6 * fids[1], fids
    assert all(a < b for a, b in zip(fids[1:], fids[2:])), f"FID not increasing with noise: {fids}"


def test_injected_real_statistics_equal_torchmetrics_own_update(digits, classifier_extractor):
    """The cached-statistics path gives the same FID as feeding the real images to torchmetrics."""
    real, fake = real_pixels(digits, "test"), real_pixels(digits, "train")[:300].flip(-1)
    direct = make_fid_metric(classifier_extractor, sync_on_compute=False)
    direct.update(real[:100], real=True)
    direct.update(real[100:], real=True)
    direct.update(fake, real=False)
    assert fid_between(classifier_extractor, real, fake) == pytest.approx(float(direct.compute()), rel=1e-9)


def test_feature_statistics_round_trip_through_the_cache_file(tmp_path, digits, classifier_extractor):
    stats = feature_statistics(classifier_extractor, real_pixels(digits, "test"))
    stats.save(tmp_path / "s.pt")
    loaded = FeatureStatistics.load(tmp_path / "s.pt")
    assert loaded.count == 180 and torch.equal(loaded.total, stats.total) and torch.equal(loaded.outer, stats.outer)


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
    features = extractor(grey)
    assert features.shape == (3, 2048) and features.dtype == torch.float64 and features.isfinite().all()
    # grey repeated to 3 channels and rounded to uint8, then torch-fidelity's own (non-antialiased)
    # resize and network: the reference FID pipeline
    uint8 = (grey.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8)
    assert torch.equal(features, extractor.network(uint8)[0].double())
    metric = make_fid_metric(extractor, sync_on_compute=False)
    real = FeatureStatistics.zeros(2048)
    real.add_features(features)
    set_real_statistics(metric, real, owner=True)
    update_fake(metric, real_pixels(digits, "train")[:3])
    fid = float(metric.compute())
    assert math.isfinite(fid) and fid >= -1e-6


def test_inception_without_weights_offline_names_the_fix():
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
                    side_effect=OSError("no network")):
        with pytest.raises(RuntimeError, match="feature_extractor_weights_path"):
            InceptionFeatures(None)


def test_generation_is_the_same_set_for_any_number_of_ranks(digits):
    model = fitted_gaussian(digits.split("train"))
    n, chunk = 130, 50
    single = generate_rank_share(model, n, chunk, seed=3, rank=0, world=1)
    for world in (2, 3):
        shares = {r: generate_rank_share(model, n, chunk, seed=3, rank=r, world=world) for r in range(world)}
        by_chunk = {i: None for i in range(3)}
        for r in range(world):
            offset = 0
            for index, length in rank_chunks(n, chunk, r, world):
                by_chunk[index] = shares[r][offset:offset + length]
                offset += length
        assert torch.equal(torch.cat([by_chunk[i] for i in range(3)]), single)
        assert sum(len(s) for s in shares.values()) == n


def test_fid_callback_logs_names_floor_and_cost_and_caches_real_statistics(tmp_path, digits):
    clf = random_classifier_file(tmp_path / "clf.pt")
    model = fitted_gaussian(digits.split("train"))

    def run():
        callback = FIDCallback(n=120, chunk_size=60, feature_extractor_weights_path=str(clf), cache_dir=str(tmp_path))
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, callbacks=[callback])
        trainer.test(model, datamodule=digits, verbose=False)
        return callback.last_logged, dict(trainer.callback_metrics)

    first, metrics = run()
    assert set(first) == {"test/fid_classifier_test_n120", "test/fid_floor_classifier_test_n120",
                          "test/nfe_per_sample", "test/sec_per_sample"}
    assert set(first) <= set(metrics)
    assert first["test/nfe_per_sample"] == 1.0 and first["test/sec_per_sample"] > 0
    assert first["test/fid_classifier_test_n120"] > first["test/fid_floor_classifier_test_n120"] > 0
    cached = sorted(p.name for p in (tmp_path / "fid_stats").iterdir())
    assert len(cached) == 2 and any("floor_train_vs_test_n120" in name for name in cached)
    again, _ = run()  # from the cache: same numbers
    assert again["test/fid_classifier_test_n120"] == pytest.approx(first["test/fid_classifier_test_n120"], rel=1e-12)
    assert again["test/fid_floor_classifier_test_n120"] == first["test/fid_floor_classifier_test_n120"]


def test_fid_callback_rejects_non_image_data_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="feature_extractor"):
        FIDCallback(feature_extractor="vgg")
    with pytest.raises(ValueError, match="real_split"):
        FIDCallback(real_split="holdout")
    toy = GenerativeDataModule("moons")
    with pytest.raises(ValueError, match="image dataset"):
        real_pixels(toy, "test")


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
