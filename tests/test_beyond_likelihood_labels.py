"""TarFlow's and MeanFlow's likelihoods through the shared evaluator (issue 23 beside issue 20's labels): every kind
they report gets a label, the density of TarFlow's noise-augmented data is never a bound on the data's NLL nor the
headline, and MeanFlow's is named as the instantaneous field's ODE likelihood, on discrete and continuous data."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.evaluation import EvaluationSpec, Evaluator
from lightning_flows.models import MeanFlow, TarFlow

SPEC = dict(likelihood=True, quality=False, timing=False, extras=False, progress=False, max_likelihood_examples=8,
            likelihood_batch_size=8, iw_samples=2)


def _evaluate(model, dataset: str) -> dict:
    dm = GenerativeDataModule(dataset, batch_size=16)
    dm.setup()
    torch.manual_seed(0)
    return Evaluator(EvaluationSpec(**SPEC)).evaluate(model.eval(), dm)


@pytest.fixture(scope="module")
def tarflow_digits() -> dict:
    torch.manual_seed(0)
    model = TarFlow((1, 8, 8), network=dict(patch_size=2, blocks=2, layers=1, width=16, heads=2),
                    noise={"sigma": 0.2})
    return _evaluate(model, "digits")


def test_tarflow_on_digits_reports_both_kinds_and_only_the_data_density_bounds_the_discrete_nll(tarflow_digits):
    result = tarflow_digits
    assert math.isfinite(result["bpd_exact"]) and math.isfinite(result["bpd_exact_noisy"])
    assert result["likelihood_label_exact"] == "dequantised bound"
    assert "noise-augmented" in result["likelihood_label_exact_noisy"]
    assert result["nll_upper_bound_exact"] and not result["nll_upper_bound_exact_noisy"]
    assert "bpd_iw_exact" in result and "bpd_iw_exact_noisy" not in result  # no IW average of another variable
    assert result["likelihood_source_discrete"] in ("bpd_exact", "bpd_iw_exact")


def test_meanflow_likelihood_is_labelled_as_the_instantaneous_fields_on_digits_and_on_2d_data():
    torch.manual_seed(0)
    image = MeanFlow((1, 8, 8), backbone={"kind": "mlp", "hidden": 16, "depth": 1})
    digits = _evaluate(image, "digits")
    (kind,) = [k[len("bpd_"):] for k in digits if k.startswith("bpd_") and not k.startswith("bpd_iw")
               and k.endswith("_instantaneous")]
    assert "u(z, t, t)" in digits[f"likelihood_label_{kind}"] and digits[f"nll_upper_bound_{kind}"]
    assert math.isfinite(digits["bpd_discrete"])
    toy = _evaluate(MeanFlow((2,), backbone={"kind": "mlp", "hidden": 8, "depth": 1}), "8gaussians")
    gaps = [k for k in toy if k.startswith("nll_gap_")]
    assert gaps and all(math.isfinite(toy[k]) for k in gaps)
    assert all("u(z, t, t)" in toy[k.replace("nll_gap_", "likelihood_label_")] for k in gaps)
