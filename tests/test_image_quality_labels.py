"""Image sample quality says what it measured (issue 20, items 6 and 7): the floor's n and set, the model's FID at
the floor's n when the floor holds fewer images than were sampled, a KID std that is not zero by construction, and
a VAE that shows decoder means scored on true draws too."""

from __future__ import annotations

import pytest
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import EvaluationSpec, Evaluator
from lightning_flows.evaluation.reference import CLASSIFIER_HOLDOUT
from lightning_flows.metrics import frechet_distance, kernel_distance
from lightning_flows.metrics.classifier import FLOOR_POOL_SIZE
from lightning_flows.models import VAE
from test_eval_helpers import fitted_gaussian


@pytest.fixture(scope="module")
def digits():
    dm = GenerativeDataModule("digits", batch_size=64)
    dm.setup()
    return dm


def spec(tmp_path, **kwargs) -> EvaluationSpec:
    return EvaluationSpec(likelihood=False, timing=False, progress=False, kid_subsets=20, cache_dir=str(tmp_path),
                          **kwargs)


def test_floor_is_the_classifiers_holdout_and_a_larger_sample_also_gets_its_fid_at_the_floors_n(digits, tmp_path):
    model = fitted_gaussian(digits.split("train"))
    evaluator = Evaluator(spec(tmp_path, n_samples=520, sample_batch_size=260))
    result = evaluator.evaluate(model, digits, run_seed=0)
    assert result["floor_split"] == CLASSIFIER_HOLDOUT and result["n_floor"] == FLOOR_POOL_SIZE["digits"] == 500
    assert result["n_quality"] == 520 and result["kid_subset_size"] == 90  # half the 180 reference digits
    reference, _, _ = evaluator._reference_and_floor(digits, torch.device("cpu"), 0, 1)
    fake = evaluator._features([(0, evaluator.last_samples)], digits, torch.device("cpu"), 0, 1, "features")
    assert result["fid_at_floor_n"] == pytest.approx(frechet_distance(reference, fake[:500]), rel=1e-9)
    smaller = Evaluator(spec(tmp_path, n_samples=200, sample_batch_size=200)).evaluate(model, digits)
    assert "fid_at_floor_n" not in smaller and smaller["n_floor"] == 200


def test_kid_std_over_subsets_is_not_zero_when_both_sets_have_the_subsets_size():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(60, 8, generator=g), torch.randn(60, 8, generator=g) + 0.3
    _, std = kernel_distance(real, fake, subsets=20)
    assert std > 0  # subsets of 30 of 60: every subset differs (a subset of 60 was the whole set every time)


def test_a_vae_showing_decoder_means_is_also_scored_on_true_draws(digits, tmp_path):
    torch.manual_seed(0)
    model = VAE(data_shape=(1, 8, 8), data_levels=17, latent_dim=4, network="mlp", hidden=32, depth=1,
                decoder="discretized_logistic", sample_mode="mean")
    result = Evaluator(spec(tmp_path, n_samples=200, sample_batch_size=100)).evaluate(model, digits)
    assert result["sample_mode"] == "mean" and model.sample_mode == "mean"  # restored after the true draws
    for key in ("fid", "kid", "precision", "recall"):
        assert f"{key}_true_draws" in result
    assert result["fid_true_draws"] != result["fid"]
    model.sample_mode = "sample"
    drawn = Evaluator(spec(tmp_path, n_samples=200, sample_batch_size=100)).evaluate(model, digits)
    assert drawn["sample_mode"] == "sample" and "fid_true_draws" not in drawn
    assert drawn["fid"] == pytest.approx(result["fid_true_draws"], rel=1e-9)  # same seed, same draws
