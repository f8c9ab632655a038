"""Error hints and logger placement read class paths from the user's config; they never import a module named
there (jsonargparse has imported every class it validated, so only modules already loaded are read)."""

from __future__ import annotations

import sys

from lightning_flows.cli_errors import _init_parameters
from lightning_flows.logger_placement import _kind

NEVER_IMPORTED = "this"  # the standard library's Zen of Python: importing it prints, so nothing imports it


def test_hints_and_logger_placement_do_not_import_a_module_a_config_names():
    sys.modules.pop(NEVER_IMPORTED, None)
    assert _init_parameters(f"{NEVER_IMPORTED}.Anything") == []
    assert _kind(f"{NEVER_IMPORTED}.Anything") == "other"
    assert NEVER_IMPORTED not in sys.modules


def test_classes_already_loaded_are_still_read():
    assert "num_classes" in _init_parameters("lightning_flows.models.CNF")
    assert _kind("lightning.pytorch.loggers.CSVLogger") == "versioned"
    assert _kind("lightning.pytorch.loggers.WandbLogger") == "wandb"
