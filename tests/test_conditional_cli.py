"""`lightning-flows fit` of a conditional config, then `lightning-flows sample --class 7 --guidance 2` (issue 14)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_flows.checkpoints import load_model_and_data
from lightning_flows.cli import main, requested_grid
from lightning_flows.models import FlowMatching

CONFIG = "experiments/digits/flow_matching_conditional.yaml"
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--model.init_args.sampler.steps", "2",
        "--model.init_args.base_channels", "8", "--model.init_args.channel_mults", "[1, 2]", "--sample_grid.n", "10"]


@pytest.fixture(scope="module")
def conditional_checkpoint(tmp_path_factory):
    from conftest import quiet_fit_args

    root = tmp_path_factory.mktemp("cond_cli")
    main(["fit", "--config", CONFIG, *quiet_fit_args(root, *TINY)])
    matches = glob.glob(f"{root}/**/checkpoints/*.ckpt", recursive=True)
    assert len(matches) == 1
    return Path(matches[0])


def test_fit_links_num_classes_and_the_checkpoint_is_conditional(conditional_checkpoint):
    model, datamodule = load_model_and_data(conditional_checkpoint)
    assert datamodule.conditional and model.num_classes == 10 and model.is_conditional
    # The run's sample grid has one row per class (sample_grid.n 10: one sample per class).
    grid = conditional_checkpoint.parent.parent / "samples" / "epoch0000.png"
    assert Image.open(grid).size == (66 + 2, 10 * 66 + 2)


def test_sample_draws_one_class_or_one_row_per_class(conditional_checkpoint, tmp_path):
    one = tmp_path / "seven.png"
    main(["sample", "--ckpt", str(conditional_checkpoint), "--class", "7", "--guidance", "2", "--n", "16",
          "--out", str(one)])
    assert Image.open(one).size == (4 * 66 + 2, 4 * 66 + 2)  # 16 digits upscaled to 64 px, padding 2
    rows = tmp_path / "rows.png"
    main(["sample", "--ckpt", str(conditional_checkpoint), "--per-class", "3", "--out", str(rows)])
    assert Image.open(rows).size == (3 * 66 + 2, 10 * 66 + 2)  # one row per class


def test_sample_refuses_a_class_out_of_range(conditional_checkpoint, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(conditional_checkpoint), "--class", "10", "--out", "unused.png"])
    error = capsys.readouterr().err
    assert "out of range" in error and "0..9" in error


def test_class_and_guidance_are_refused_for_an_unconditional_model():
    model = FlowMatching(data_shape=(2,), hidden=8, depth=1)
    for requested_class, guidance in ((7, 1.0), (None, 2.0)):
        with pytest.raises(ValueError, match="unconditional"):
            requested_grid(model, requested_class, 16, 10, guidance)
    labels, per_row, _, _ = requested_grid(FlowMatching(data_shape=(2,), hidden=8, depth=1, num_classes=3),
                                           None, 16, 4, 1.0)
    assert per_row == 4 and torch.equal(labels, torch.tensor([0] * 4 + [1] * 4 + [2] * 4))
