"""The one evaluator: every likelihood kind reported apart, the VAE's posterior gap, the weights a user
samples from (EMA), and the callbacks giving exactly the numbers the benchmark computes."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_flows.callbacks import EMACallback, FIDCallback
from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import EvaluationSpec, Evaluator, sampling_weights, weights_in_use
from lightning_flows.evaluation.likelihood import POSTERIOR_GAP
from lightning_flows.evaluation.samples import chunk_seed
from lightning_flows.models import VAE
from test_eval_helpers import DiagonalGaussian, fitted_gaussian, random_classifier_file


@pytest.fixture(scope="module")
def digits():
    dm = GenerativeDataModule("digits", batch_size=64)
    dm.setup()
    return dm


class TwoLikelihoods(DiagonalGaussian):
    """An exact density and a looser 'bound' of it, as a diffusion model reports both."""

    def likelihood_estimators(self):
        return {"exact": self.log_prob, "bound": lambda x: self.log_prob(x) - 1.0}


def test_each_likelihood_kind_is_reported_in_its_own_key(digits):
    model = TwoLikelihoods(data_shape=(1, 8, 8))
    spec = EvaluationSpec(quality=False, timing=False, progress=False)
    result = Evaluator(spec).evaluate(model, digits)
    assert result["nll_bound"] == pytest.approx(result["nll_exact"] + 1.0)
    assert result["bpd_bound"] > result["bpd_exact"]
    assert result["likelihood_examples"] == 180 and result["likelihood_split"] == "test"
    none = fitted_gaussian(digits.split("train"), likelihood="none")
    assert not any(k.startswith(("nll", "bpd")) for k in Evaluator(spec).evaluate(none, digits))


def test_toy_likelihood_reports_the_gap_to_the_true_entropy():
    dm = GenerativeDataModule("8gaussians")
    model = fitted_gaussian(dm.split("train"))
    result = Evaluator(EvaluationSpec(quality=False, timing=False, progress=False,
                                      max_likelihood_examples=1000)).evaluate(model, dm)
    entropy = float(-dm.true_log_density(dm.split("test")[:1000]).double().mean())
    assert result["true_entropy_nats"] == pytest.approx(entropy)
    assert result["nll_gap_exact"] == pytest.approx(result["nll_exact"] - entropy)
    assert result["nll_gap_exact"] > 0  # one Gaussian cannot match eight
    assert "bpd_exact" not in result  # continuous data: no bits/dim


def test_vae_posterior_gap_is_the_iwae_bound_minus_the_elbo_on_the_same_draws(digits):
    torch.manual_seed(0)
    model = VAE(data_shape=(1, 8, 8), latent_dim=4, network="mlp", hidden=32, depth=1, iwae_k=8).eval()
    spec = EvaluationSpec(quality=False, timing=False, progress=False, likelihood_batch_size=100)
    result = Evaluator(spec).evaluate(model, digits)
    test, gaps, bounds = digits.split("test"), [], []
    with torch.no_grad():
        for index, batch in enumerate(test.split(100)):
            torch.manual_seed(chunk_seed(spec.seed, index))
            bound = model.log_prob(batch)
            gaps.append(bound - model.elbo(batch))
            bounds.append(bound)
    assert result[POSTERIOR_GAP] == pytest.approx(float(torch.cat(gaps).double().mean()), rel=1e-5)
    assert result["nll_bound"] == pytest.approx(float(-torch.cat(bounds).double().mean()), rel=1e-6)
    assert result[POSTERIOR_GAP] > 0  # IWAE_8 is tighter than the ELBO on average


def _trainer(*callbacks, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


def test_sampling_weights_swap_the_ema_in_and_back(digits):
    model = DiagonalGaussian(data_shape=(1, 8, 8))
    ema = EMACallback(decay=0.5)
    trainer = _trainer(ema, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=digits)
    assert weights_in_use(trainer) == "ema"  # fit ends with the averaged weights in the model
    with sampling_weights(trainer, model) as label:  # so nothing is swapped
        assert label == "ema" and torch.equal(model.mean, ema.shadow["mean"])
    ema.swap_out(model)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    assert weights_in_use(trainer) == "training"
    with sampling_weights(trainer, model) as label:
        assert label == "ema" and weights_in_use(trainer) == "ema"
        assert not torch.equal(model.mean, training["mean"])
        assert torch.equal(model.mean, ema.shadow["mean"])
    assert all(torch.equal(v, training[k]) for k, v in model.state_dict().items())
    plain = _trainer(max_steps=1, limit_val_batches=0)
    plain.fit(DiagonalGaussian(data_shape=(1, 8, 8)), datamodule=digits)
    with sampling_weights(plain, plain.lightning_module) as label:
        assert label == "training"


def test_benchmark_evaluation_and_the_fid_callback_agree_on_the_same_samples_and_ema_weights(tmp_path, digits):
    """The runner's path (sampling_weights + Evaluator with the full spec) and FIDCallback during
    `trainer.test` (EMA swapped in by Lightning) give the same FID, KID and precision/recall."""
    classifier = random_classifier_file(tmp_path / "clf.pt")
    model = fitted_gaussian(digits.split("train"))
    ema = EMACallback(decay=0.9)
    trainer = _trainer(ema, max_steps=4, limit_val_batches=0)
    trainer.fit(model, datamodule=digits)

    spec = EvaluationSpec(n_samples=150, sample_batch_size=50, feature_extractor_weights_path=str(classifier),
                          cache_dir=str(tmp_path), kid_subsets=10, progress=False)
    with sampling_weights(trainer, model) as label:
        benchmark = Evaluator(spec).evaluate(model, digits, weights=label)
    fid = FIDCallback(n=150, chunk_size=50, feature_extractor_weights_path=str(classifier), cache_dir=str(tmp_path),
                      progress=False)
    fid.spec.kid_subsets = 10
    tester = _trainer(ema, fid)
    tester.test(model, datamodule=digits, verbose=False)
    callback = fid.last_result
    assert benchmark["weights"] == callback["weights"] == "ema"
    for key in ("fid", "fid_floor", "kid", "kid_floor", "precision", "recall", "nfe_per_sample"):
        assert benchmark[key] == callback[key], key
    ema.swap_out(model)
    with sampling_weights(None, model):  # the training weights give another FID
        training = Evaluator(spec).evaluate(model, digits)
    assert training["weights"] == "training" and training["fid"] != benchmark["fid"]


def test_diffusion_reports_its_bound_and_its_probability_flow_likelihood_side_by_side(digits):
    from lightning_flows.models import Diffusion

    torch.manual_seed(0)
    model = Diffusion(data_shape=(1, 8, 8), data_levels=17, num_steps=20, base_channels=8, channel_mults=(1, 2),
                      bound_timesteps=4, likelihood_divergence="hutchinson",
                      likelihood_solver={"method": "rk4", "steps": 2})
    spec = EvaluationSpec(quality=False, timing=False, progress=False, max_likelihood_examples=20)
    result = Evaluator(spec).evaluate(model, digits)
    assert {"bpd_bound", "bpd_estimate"} <= set(result) and "bpd_exact" not in result  # Hutchinson: an estimate
    exact = Diffusion(data_shape=(1, 8, 8), data_levels=17, num_steps=20, base_channels=8, channel_mults=(1, 2),
                      likelihood_kind="ode")
    assert exact.likelihood_kind == "exact" and set(exact.likelihood_estimators()) == {"bound", "exact"}


@pytest.mark.parametrize("split", ["test", "train"])
def test_testing_scores_the_likelihood_on_the_specs_split(digits, split):
    """`lightning-flows test --evaluation.spec.likelihood_split train` scores the training digits (before the fix
    the test split was scored whatever the spec said) and gives the evaluator's numbers for that split."""
    from lightning_flows.callbacks import EvaluationCallback

    model = fitted_gaussian(digits.split("train"))
    spec = EvaluationSpec(quality=False, timing=False, progress=False, likelihood_split=split,
                          max_likelihood_examples=300)
    callback = EvaluationCallback(spec)
    _trainer(callback).test(model, datamodule=digits, verbose=False)
    direct = Evaluator(spec).evaluate(model, digits)
    assert callback.last_result["likelihood_split"] == direct["likelihood_split"] == split
    assert callback.last_result["likelihood_examples"] == (300 if split == "train" else 180)
    assert callback.last_result["bpd_exact"] == pytest.approx(direct["bpd_exact"], rel=1e-6)
    # Logged under names that say which split was scored: a train-split score never reads as test/bpd_exact.
    suffix = "" if split == "test" else "_on_train"
    assert callback.last_logged[f"test/bpd_exact{suffix}"] == pytest.approx(direct["bpd_exact"], rel=1e-6)
    assert callback.last_logged[f"test/likelihood_examples{suffix}"] == callback.last_result["likelihood_examples"]
    assert split == "test" or not any(name.startswith(("test/bpd", "test/nll")) and not name.endswith(suffix)
                                      for name in callback.last_logged)
