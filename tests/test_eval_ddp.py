"""The evaluator under DDP (2 CPU ranks, gloo): FID, KID, precision/recall, bits/dim (one draw and importance-
weighted over dequantisation draws), sampling cost and a sampling variant's FID on digits, and the 2D metrics with
their nulls and sampling noise on 8 Gaussians, equal the single-process values.

The DDP run is a subprocess (this file run as a script: Lightning's DDP launcher starts rank 1 by
re-running the same command) with a timeout: a metric computed in a rank-zero-only hook would
leave rank zero waiting in an all-reduce forever, and here that fails the test instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the script form runs without the package installed
    sys.path.insert(0, str(REPO))

from subprocess_runs import run as run_process  # noqa: E402
from lightning_flows.callbacks import EvaluationCallback  # noqa: E402
from lightning_flows.data import GenerativeDataModule  # noqa: E402
from lightning_flows.evaluation import EvaluationSpec  # noqa: E402
from test_eval_helpers import DiagonalGaussian, fitted_gaussian, random_classifier_file  # noqa: E402

N_SAMPLES, CHUNK = 200, 50


class GaussianWithAVariant(DiagonalGaussian):
    """A sampling variant (as MeanFlow's 2 steps): a colder draw, reported at 2 NFE per sample."""

    def sample(self, n: int, temperature: float = 1.0):
        x = self.mean + temperature * self.log_std.exp() * torch.randn(n, *self.data_shape, device=self.device)
        self.last_sample_nfe = 1 if temperature == 1.0 else 2
        return x

    def sampling_variants(self):
        return [{"temperature": 0.5}]


def _test(devices: int, datamodule, model, spec: EvaluationSpec) -> tuple[L.Trainer, EvaluationCallback]:
    evaluation = EvaluationCallback(spec)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[evaluation])
    trainer.test(model, datamodule=datamodule, verbose=False)
    return trainer, evaluation


def run_evaluation(devices: int, out_dir: Path, classifier: Path, cache_dir: Path, model_path: Path) -> dict:
    """``trainer.test`` with the evaluation callback on digits, then on 8 Gaussians; each rank writes what it
    logged."""
    model = GaussianWithAVariant()
    model.load_state_dict(torch.load(model_path, weights_only=True))
    spec = EvaluationSpec(n_samples=N_SAMPLES, sample_batch_size=CHUNK, likelihood_batch_size=40, kid_subsets=10,
                          iw_samples=3, feature_extractor_weights_path=str(classifier), cache_dir=str(cache_dir),
                          progress=False)
    trainer, evaluation = _test(devices, GenerativeDataModule("digits", batch_size=64, eval_batch_size=40), model,
                                spec)
    points = GenerativeDataModule("8gaussians", batch_size=64)
    point_spec = EvaluationSpec(n_samples=N_SAMPLES, sample_batch_size=CHUNK, likelihood_batch_size=40,
                                max_likelihood_examples=200, null_draws=4, sampling_std_draws=1,
                                cache_dir=str(cache_dir), progress=False)
    _, point_evaluation = _test(devices, points, fitted_gaussian(points.split("train")), point_spec)
    result = {"rank": trainer.global_rank, "world": trainer.world_size,
              "rank_samples": evaluation.evaluator.last_rank_samples, **evaluation.last_logged,
              **{f"8gaussians/{k}": v for k, v in point_evaluation.last_logged.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_eval")
    dm = GenerativeDataModule("digits")
    model_path = root / "gaussian.pt"
    torch.save(fitted_gaussian(dm.split("train")).state_dict(), model_path)
    return root, random_classifier_file(root / "classifier.pt"), model_path


@pytest.mark.timeout(420)
def test_fid_and_bpd_under_ddp_equal_the_single_process_values(setup_files):
    root, classifier, model_path = setup_files
    single = run_evaluation(1, root / "single", classifier, root / "cache_single", model_path)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(Path(__file__).resolve()), "--devices", "2", "--out", str(root / "ddp"),
               "--classifier", str(classifier), "--cache-dir", str(root / "cache_ddp"), "--model", str(model_path)]
    try:
        done = run_process(command, timeout=360, env=env, cwd=root)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"DDP evaluation hung (a collective not reached by every rank?): {err}")
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [json.loads((root / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["rank_samples"] for r in ranks] == [N_SAMPLES // 2, N_SAMPLES // 2]  # n / world each
    assert single["rank_samples"] == N_SAMPLES
    names = [f"test/fid_classifier_test_n{N_SAMPLES}", f"test/fid_floor_classifier_test_n{N_SAMPLES}",
             f"test/kid_classifier_test_n{N_SAMPLES}", "test/precision", "test/recall",
             "test/bpd_exact", "test/bpd_iw_exact", "test/bpd_discrete", "test/likelihood_examples",
             "test/nfe_per_sample", f"test/fid_nfe2_classifier_test_n{N_SAMPLES}"]
    names += [f"8gaussians/test/{key}" for key in (
        "nll_exact", "energy_distance", "mmd", "ce_gap_nats", "precision", "recall", "energy_distance_null_std",
        "mmd_null_std", "ce_gap_nats_null_std", "mmd_sampling_std", "ce_gap_nats_sampling_std", "modes_hit")]
    for rank in ranks:
        for name in names:
            assert rank[name] == pytest.approx(single[name], rel=1e-6, abs=0), name
    assert ranks[0]["test/likelihood_examples"] == 180
    assert ranks[0]["test/bpd_iw_exact"] < ranks[0]["test/bpd_exact"]  # three draws per digit, not one
    assert single[f"test/fid_nfe2_classifier_test_n{N_SAMPLES}"] != single[f"test/fid_classifier_test_n{N_SAMPLES}"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--classifier", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    opts = parser.parse_args()
    run_evaluation(opts.devices, opts.out, opts.classifier, opts.cache_dir, opts.model)
    from lightning_flows.cli import end_distributed

    end_distributed()
