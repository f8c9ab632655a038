"""The digits feature space is the same on every machine (issue 20, item 9): the classifier ships inside the package,
its sha256 checked at load; and the images it is scored on are images it never saw, for every data seed (item 10):
the reference (test split) and the floor's hold-out are disjoint from its training examples."""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.registry import load_dataset
from lightning_flows.evaluation import EvaluationSpec, Evaluator
from lightning_flows.metrics import classifier as classifier_module
from lightning_flows.metrics.classifier import (FLOOR_POOL_SIZE, SHIPPED, WEIGHTS_DIR, classifier_data, file_sha256,
                                                load_classifier, load_or_train_classifier, shipped_classifier_path,
                                                state_fingerprint)
from lightning_flows.metrics.features import build_feature_extractor
from lightning_flows.metrics.train_classifier import main as train_main
from test_eval_helpers import fitted_gaussian


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_classifier_matches_its_hash_and_fingerprint_and_is_used_without_training(dataset):
    name, sha256, fingerprint = SHIPPED[dataset]
    path = WEIGHTS_DIR / name
    assert path.is_file() and file_sha256(path) == sha256
    assert path.stat().st_size < 1_000_000  # small enough to ship
    with mock.patch.object(classifier_module, "train_classifier", side_effect=AssertionError("trained")):
        model = load_or_train_classifier(dataset)
        extractor = build_feature_extractor("classifier", dataset)
    assert state_fingerprint(model) == fingerprint and extractor.fingerprint == fingerprint


def test_a_changed_shipped_file_is_refused_with_the_fix(tmp_path):
    original = shipped_classifier_path("digits")
    damaged = tmp_path / original.name
    payload = bytearray(original.read_bytes())
    payload[-100] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    with pytest.raises(RuntimeError, match="sha256.*Reinstall"):
        load_classifier(damaged, sha256=SHIPPED["digits"][1])


def test_train_script_check_compares_fingerprints(capsys):
    shipped = load_classifier(shipped_classifier_path("digits"))
    other = load_classifier(shipped_classifier_path("digits"))
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with mock.patch("lightning_flows.metrics.train_classifier.train_classifier", return_value=(shipped, 0.97)):
        assert train_main(["--dataset", "digits", "--check"]) == 0
    assert "identical weights" in capsys.readouterr().out
    with mock.patch("lightning_flows.metrics.train_classifier.train_classifier", return_value=(other, 0.97)):
        assert train_main(["--dataset", "digits", "--check"]) == 1
    assert "OTHER weights" in capsys.readouterr().out


def _rows(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    """Examples as a multiset of (pixel bytes, label): a dataset may hold identical images."""
    flat = (images * 1000).round().to(torch.int32).flatten(1)
    return Counter((row.numpy().tobytes(), int(y)) for row, y in zip(flat, labels))


@pytest.mark.parametrize("dataset", ["digits", pytest.param("mnist5k", marks=pytest.mark.slow)])  # mnist5k: ~50 s
def test_the_classifier_never_trains_on_the_reference_or_the_floor_for_any_data_seed(dataset):
    data = classifier_data(dataset)
    train, floor = _rows(*data.train), _rows(*data.floor)
    assert sum(floor.values()) == FLOOR_POOL_SIZE[dataset]
    for seed in range(5):
        splits = load_dataset(dataset, seed=seed)
        scale = splits.info.levels - 1
        reference = _rows(splits.test.float() / scale, splits.test_labels)
        everything = _rows(torch.cat([splits.train, splits.val, splits.test]).float() / scale,
                           torch.cat([splits.train_labels, splits.val_labels, splits.test_labels]))
        # Each example of the dataset is used exactly once across the classifier's training set, the floor's
        # hold-out and this seed's reference: pairwise disjoint (as multisets).
        assert train + floor + reference == everything, seed


def test_built_in_classifier_refuses_a_reference_it_may_have_trained_on():
    dm = GenerativeDataModule("digits")
    spec = EvaluationSpec(likelihood=False, timing=False, progress=False, n_samples=50, reference_split="val")
    with pytest.raises(ValueError, match="reference_split: val.*test"):
        Evaluator(spec).evaluate(fitted_gaussian(dm.split("train")), dm)
