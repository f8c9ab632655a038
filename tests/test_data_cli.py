"""User data through the command line (issue 22): every family trains on a folder of PNGs in two class folders
and on an .npz through ``lightning-flows fit`` with the committed configs; ``lightning-flows test`` reports
bits/dim and FID (with its floor) on the folder; the run directory records the split manifest; a conditional
model trains on the folder's labels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import quiet_fit_args
from user_data import make_folder, make_npz

from lightning_flows.checkpoints import load_model_and_data
from lightning_flows.cli import main
from lightning_flows.metrics.classifier import FeatureClassifier, save_classifier
from test_fid import random_inception_weights  # noqa: F401  (a fixture: Inception at random init, offline)

FAMILIES = ["vae", "gan", "realnvp", "glow", "nsf", "cnf", "diffusion", "flow_matching"]
# Kept in the default run (the rest: make test-slow): the multi-scale flow on the folder, a UNet family on the npz.
DEFAULT = {("glow", "folder"), ("flow_matching", "npz")}
TINY = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--data.batch_size", "16", "--sample_grid.n", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_data")
    return {"folder": make_folder(root / "pets", per_class=100, size=10),
            "npz": make_npz(root / "a.npz", n=200, size=8), "cache": root / "cache"}


def _fit(config: str, root: Path, dataset: Path, cache: Path, *extra: str) -> Path:
    resize = ["--data.image_size", "8"] if dataset.is_dir() else []
    main(["fit", "--config", config, *quiet_fit_args(root, *TINY, "--data.dataset", str(dataset),
                                                       "--data.cache_dir", str(cache), *resize, *extra)])
    (checkpoint,) = root.glob("**/checkpoints/last.ckpt")
    return checkpoint


@pytest.mark.parametrize("family, kind", [pytest.param(f, k, marks=() if (f, k) in DEFAULT else pytest.mark.slow)
                                          for f in FAMILIES for k in ("folder", "npz")])
def test_every_family_trains_on_a_folder_and_an_npz_through_the_cli(tmp_path, data, family, kind):
    checkpoint = _fit(f"experiments/digits/{family}.yaml", tmp_path, data[kind], data["cache"])
    model, datamodule = load_model_and_data(checkpoint)
    assert tuple(model.data_shape) == datamodule.data_shape == (3, 8, 8) and datamodule.levels == 256
    assert datamodule.dataset == str(data[kind])
    manifest = checkpoint.parent.parent / "data_splits.csv"
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == 200 and {row["split"] for row in rows} == {"train", "val", "test"}


def _classifier_weights(path: Path) -> Path:
    """An untrained feature classifier for 3-channel, 2-class images (no training, no download)."""
    torch.manual_seed(0)
    return save_classifier(FeatureClassifier(in_channels=3, num_classes=2), path, "pets", accuracy=0.0)


def test_test_reports_bits_per_dim_and_fid_on_a_folder_and_a_conditional_model_trains_on_its_labels(tmp_path, data):
    checkpoint = _fit("experiments/digits/glow_conditional.yaml", tmp_path, data["folder"], data["cache"],
                      "--model.init_args.steps", "1", "--model.init_args.hidden", "16")
    model, datamodule = load_model_and_data(checkpoint)
    assert datamodule.conditional and model.num_classes == 2 and model.is_conditional
    weights = _classifier_weights(tmp_path / "classifier.pt")
    main(["test", "--config", "experiments/digits/glow_conditional.yaml", "--ckpt_path", str(checkpoint),
          *quiet_fit_args(tmp_path / "test", "--data.dataset", str(data["folder"]), "--data.image_size", "8",
                          "--data.cache_dir", str(data["cache"]), "--evaluation.spec.n_samples", "20",
                          "--evaluation.spec.sample_batch_size", "20", "--evaluation.spec.kid_subsets", "5",
                          "--evaluation.spec.feature_extractor_weights_path", str(weights),
                          "--evaluation.spec.cache_dir", str(tmp_path / "eval_cache"),
                          "--evaluation.spec.progress", "false")])
    (log,) = (tmp_path / "test").glob("**/metrics.csv")
    row = {k: v for r in csv.DictReader(log.open()) for k, v in r.items() if v}
    bpd = float(row["test/bpd_exact"])
    assert math.isfinite(bpd) and 0 < bpd < 16  # 256 levels: a 2-step Glow sits far above 0, below absurd
    fid, floor = float(row["test/fid_classifier_test_n20"]), float(row["test/fid_floor_classifier_test_n20"])
    assert math.isfinite(fid) and math.isfinite(floor) and fid > floor >= 0
    assert list((tmp_path / "eval_cache" / "reference_features").glob("pets_test_classifier-*.pt"))  # by content


@pytest.mark.slow
def test_inception_fid_on_a_folder(tmp_path, data, request):
    weights = request.getfixturevalue("random_inception_weights")  # test_fid's offline stand-in weights
    checkpoint = _fit("experiments/digits/glow.yaml", tmp_path, data["folder"], data["cache"],
                      "--model.init_args.steps", "1", "--model.init_args.hidden", "16")
    main(["test", "--config", "experiments/digits/glow.yaml", "--ckpt_path", str(checkpoint),
          *quiet_fit_args(tmp_path / "test", "--data.dataset", str(data["folder"]), "--data.image_size", "8",
                          "--data.cache_dir", str(data["cache"]), "--evaluation.spec.n_samples", "10",
                          "--evaluation.spec.sample_batch_size", "10", "--evaluation.spec.kid_subsets", "5",
                          "--evaluation.spec.feature_extractor", "inception",
                          "--evaluation.spec.feature_extractor_weights_path", str(weights),
                          "--evaluation.spec.cache_dir", str(tmp_path / "eval_cache"),
                          "--evaluation.spec.progress", "false")])
    (log,) = (tmp_path / "test").glob("**/metrics.csv")
    row = {k: v for r in csv.DictReader(log.open()) for k, v in r.items() if v}
    assert math.isfinite(float(row["test/fid_inception_test_n10"])) and math.isfinite(float(row["test/bpd_exact"]))



@pytest.mark.parametrize("family, size", [("glow", 10), ("realnvp", 9)])  # digits configs: levels 2
def test_an_image_size_a_multiscale_flow_cannot_squeeze_names_levels_and_writes_nothing(tmp_path, data, family,
                                                                                        size):
    with pytest.raises(SystemExit, match=r"^error: .* has an odd side and cannot be squeezed; lower `levels`"):
        main(["fit", "--config", f"experiments/digits/{family}.yaml",
              *quiet_fit_args(tmp_path, *TINY, "--data.dataset", str(data["folder"]), "--data.image_size", str(size),
                              "--data.cache_dir", str(data["cache"]))])
    assert not list(tmp_path.glob("**/*.ckpt")) and not list(tmp_path.glob("**/data_splits.csv"))
