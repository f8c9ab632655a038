"""The guidance sweep (experiments/benchmarks/guidance_sweep.py) in its tiny mode: both conditional configs fit
through the CLI, the shared evaluator at each w, the sample command's grids, and the table, figure and JSON."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT
from test_eval_helpers import random_classifier_file


@pytest.mark.timeout(300)
def test_tiny_guidance_sweep_writes_table_figure_and_grids(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("guidance_sweep",
                                                  ROOT / "experiments" / "benchmarks" / "guidance_sweep.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "guidance_sweep", script)
    spec.loader.exec_module(script)
    out = tmp_path / "guidance"
    threads = torch.get_num_threads()
    try:
        payload = script.main(["--tiny", "--out", str(out), "--runs", str(tmp_path / "runs"), "--threads", "1",
                               "--cache-dir", str(tmp_path / "cache"),
                               "--classifier-weights", str(random_classifier_file(tmp_path / "classifier.pt"))])
    finally:
        torch.set_num_threads(threads)
    assert (out / "guidance_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "guidance_sweep.json").read_text())["budget"]["guidances"] == [0.0, 2.0]
    table = (out / "guidance_sweep.md").read_text()
    assert "| family | w | class accuracy |" in table and "| diffusion | 2 |" in table
    for family in ("flow_matching", "diffusion"):
        result = payload["results"][family]
        assert result["steps"] == 3 and [r["guidance"] for r in result["rows"]] == [0.0, 2.0]
        for row in result["rows"]:
            assert 0.0 <= row["class_accuracy"] <= 1.0 and row["n_quality"] == 40 and row["n_quality_per_class"] == 4
        # one row per class, 2 per row, digits upscaled to 64 px with padding 2
        assert Image.open(out / f"grid_{family}_w2.png").size == (2 * 66 + 2, 10 * 66 + 2)
    assert any(c.startswith("lightning-flows sample --ckpt") for c in payload["commands"])
