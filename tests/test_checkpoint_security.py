"""A checkpoint is untrusted input: it may name a class, but only our own families are ever built."""

from __future__ import annotations

import pytest
import torch

from lightning_flows.checkpoints import CheckpointError, allowed_model_classes, load_model_and_data
from lightning_flows.cli import main
from lightning_flows.models import FlowMatching, GenerativeModel


def _crafted(path, class_path: str, hparams: dict) -> None:
    torch.save({"lightning_flows_model_class": class_path, "hyper_parameters": hparams, "state_dict": {},
                "datamodule_hyper_parameters": {"dataset": "8gaussians"}}, path)


@pytest.mark.parametrize("class_path", ["subprocess.run", "os.system", "builtins.exec",
                                        "lightning_flows.data.GenerativeDataModule",
                                        "lightning_flows.models.base.GenerativeModel"])
def test_a_checkpoint_naming_a_foreign_callable_executes_nothing(tmp_path, class_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _crafted(evil, class_path, {"args": ["touch", str(marker)], "command": f"touch {marker}"})
    with pytest.raises(CheckpointError) as info:
        load_model_and_data(evil)
    assert not marker.exists()
    message = str(info.value)
    assert str(evil) in message and class_path in message and "not a lightning-flows model" in message


def test_sample_command_refuses_the_crafted_checkpoint_with_a_clean_error(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    _crafted(evil, "subprocess.run", {"args": ["touch", str(marker)]})
    with pytest.raises(SystemExit) as info:
        main(["sample", "--ckpt", str(evil), "--out", str(tmp_path / "x.png")])
    assert not marker.exists()
    assert "subprocess.run" in str(info.value.code) and "refusing" in str(info.value.code)


def test_the_allow_list_is_exactly_our_exported_families():
    allowed = allowed_model_classes()
    assert GenerativeModel not in allowed.values()
    assert all(issubclass(cls, GenerativeModel) for cls in allowed.values())
    assert allowed["lightning_flows.models.flow_matching.FlowMatching"] is FlowMatching
    assert {"VAE", "GAN", "RealNVP", "Glow", "CNF", "Diffusion", "FlowMatching"} <= set(allowed)


def test_an_own_class_with_unexpected_hyperparameters_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    _crafted(bad, "lightning_flows.models.flow_matching.FlowMatching", {"no_such_argument": 1})
    with pytest.raises(CheckpointError, match="could not rebuild FlowMatching"):
        load_model_and_data(bad)


def test_a_checkpoint_that_is_not_a_dict_is_a_clear_error(tmp_path):
    odd = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], odd)
    with pytest.raises(CheckpointError, match="not a lightning-flows checkpoint"):
        load_model_and_data(odd)
