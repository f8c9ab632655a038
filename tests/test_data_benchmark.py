"""The benchmark on user data (issue 22): a suite's ``datasets:`` takes the path of a folder, with its ``data:``
arguments (image size, cache); runs get file-safe names; the dry run and a tiny run with its table work on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from user_data import make_folder

from lightning_flows.benchmark import runner
from lightning_flows.benchmark.store import Store
from lightning_flows.benchmark.suite import load_suite
from lightning_flows.metrics.classifier import FeatureClassifier, save_classifier

ROOT = Path(__file__).resolve().parents[1]


def _suite(tmp_path: Path, folder: Path) -> Path:
    import torch

    torch.manual_seed(0)
    weights = save_classifier(FeatureClassifier(in_channels=3, num_classes=2), tmp_path / "classifier.pt", "pets", 0.0)
    suite = {
        "name": "pets", "seeds": [0], "models": ["glow"],
        "datasets": {str(folder): {"configs": "experiments/digits", "steps": 2, "batch_size": 16,
                                   "data": {"image_size": 8, "cache_dir": str(tmp_path / "cache")}}},
        "recipe": {"model.init_args.steps": 1, "model.init_args.hidden": 16},
        "evaluation": {"n_samples": 20, "sample_batch_size": 20, "kid_subsets": 5, "progress": False,
                       "feature_extractor_weights_path": str(weights), "cache_dir": str(tmp_path / "eval_cache")},
        "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_a_suite_runs_on_a_folder_given_by_its_path(tmp_path, capsys):
    folder = make_folder(tmp_path / "my pets", per_class=60, size=10)
    suite = load_suite(_suite(tmp_path, folder), ROOT)
    (plan,) = suite.runs
    assert plan.dataset == str(folder) and "/" not in plan.slug and plan.slug.startswith("my_pets-")
    assert plan.args["data.image_size"] == 8 and suite.datamodule(str(folder)).data_shape == (3, 8, 8)
    (row,) = runner.dry_run(suite, tmp_path / "unused", [])
    assert row["family"] == "Glow"

    out = tmp_path / "out"
    table = runner.run_suite(suite.path, out, root=ROOT)
    result = Store(out).stored(plan.slug)
    assert result["dataset"] == str(folder) and result["bpd_exact"] > 0 and result["fid"] > result["fid_floor"]
    text = table.read_text()
    assert f"## {folder}" in text and "independent pixels" in text  # the reference bits/dim of the folder


FAMILIES = {"VAE", "GAN", "RealNVP", "Glow", "CNF", "Diffusion", "FlowMatching"}


def test_the_imagenet_gpu_suite_dry_runs_on_a_cpu_without_its_files(capsys):
    """Every family builds at 32x32 and 64x64 from the CIFAR-10 configs and takes a fake batch; no file is read."""
    suite = load_suite(ROOT / "experiments/suites/imagenet.yaml", ROOT)
    rows = runner.dry_run(suite, Path("unused"), [])
    assert {r["family"] for r in rows} == FAMILIES and len(rows) == 14
    assert {r["run"].split("/")[1] for r in rows} == {"imagenet32", "imagenet64"}
    assert "inception vs train" in capsys.readouterr().out
    streamed = suite.datamodule("imagenet64")
    assert streamed.data_shape == (3, 64, 64) and streamed.streaming and streamed.n_val == 10_000


@pytest.mark.slow  # the same CIFAR-10 configs at 64x64 as imagenet64 above
def test_the_celeba64_gpu_suite_dry_runs_on_a_cpu_without_its_files(capsys):
    rows = runner.dry_run(load_suite(ROOT / "experiments/suites/celeba64.yaml", ROOT), Path("unused"), [])
    assert {r["family"] for r in rows} == FAMILIES and len(rows) == 7
    assert "inception vs train" in capsys.readouterr().out
