"""The issue's done-criterion as a test: a digits flow-matching run from the CLI logs FID
(classifier features) with its floor, bits/dim, NFE and seconds/sample to the CSV log.
Slow (trains the feature classifier and evaluates an exact ODE likelihood): `make test-slow`."""

from __future__ import annotations

import csv
import math

import pytest

from lightning_flows.cli import main


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_digits_flow_matching_cli_run_logs_the_evaluation(tmp_path, monkeypatch, fit_args):
    monkeypatch.setenv("LIGHTNING_FLOWS_CACHE", str(tmp_path / "cache"))
    main(["fit", "--config", "experiments/digits/flow_matching_eval.yaml", *fit_args(
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.check_val_every_n_epoch", "1",
        "--model.init_args.base_channels", "8", "--model.init_args.sampler.steps", "4",
        "--model.init_args.likelihood_solver", '{"method": "rk4", "steps": 2}',
        "--trainer.callbacks.init_args.every_n_epochs", "1")])  # the last callback: bits/dim
    (log,) = tmp_path.glob("**/metrics.csv")
    rows = [row for row in csv.DictReader(log.open()) if row.get("val/fid_classifier_test_n1000")]
    assert len(rows) == 1
    row = rows[0]
    for name in ("val/fid_classifier_test_n1000", "val/fid_floor_classifier_test_n1000", "val/bpd_exact",
                 "val/nfe_per_sample", "val/sec_per_sample"):
        assert math.isfinite(float(row[name])), name
    assert float(row["val/nfe_per_sample"]) == 8.0  # midpoint, 4 steps
    assert float(row["val/fid_classifier_test_n1000"]) > float(row["val/fid_floor_classifier_test_n1000"]) > 0
