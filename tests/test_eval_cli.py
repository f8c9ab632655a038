"""The CLI runs the shared evaluator: a digits flow-matching fit with `evaluation.every_n_epochs` logs FID
and KID (classifier features) with their floors, precision/recall, bits/dim, NFE and ms/sample to the
CSV log; `lightning-flows test` reports the same kind of numbers at test time."""

from __future__ import annotations

import csv
import math

from lightning_flows.cli import main
from test_eval_helpers import random_classifier_file


def test_digits_flow_matching_cli_run_logs_the_evaluation(tmp_path, fit_args):
    classifier = random_classifier_file(tmp_path / "classifier.pt")  # no training, no download
    main(["fit", "--config", "experiments/digits/flow_matching_eval.yaml", *fit_args(
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.check_val_every_n_epoch", "1",
        "--model.init_args.base_channels", "8", "--model.init_args.sampler.steps", "4",
        "--model.init_args.likelihood_solver", '{"method": "rk4", "steps": 2}',
        "--evaluation.spec.n_samples", "200", "--evaluation.spec.sample_batch_size", "100",
        "--evaluation.spec.feature_extractor_weights_path", str(classifier),
        "--evaluation.spec.cache_dir", str(tmp_path / "cache"), "--evaluation.spec.progress", "false")])
    (log,) = tmp_path.glob("**/metrics.csv")
    rows = [row for row in csv.DictReader(log.open()) if row.get("val/fid_classifier_test_n200")]
    assert len(rows) == 1
    row = rows[0]
    for name in ("val/fid_classifier_test_n200", "val/fid_floor_classifier_test_n200",
                 "val/kid_classifier_test_n200", "val/precision", "val/recall", "val/bpd_estimate",
                 "val/nfe_per_sample", "val/ms_per_sample"):
        assert math.isfinite(float(row[name])), name
    assert float(row["val/nfe_per_sample"]) == 8.0  # midpoint, 4 steps
    assert float(row["val/fid_classifier_test_n200"]) > float(row["val/fid_floor_classifier_test_n200"]) > 0
    assert float(row["val/likelihood_examples"]) == 180  # the validation split, every example once
