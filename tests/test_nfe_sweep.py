"""The NFE sweep (experiments/benchmarks/nfe_sweep.py) end to end in its tiny mode: every stage (toy and digits
fits of the three couplings and MeanFlow through the CLI, reflow from the independent run's checkpoint, the
evaluator at each sampler and NFE, straightness, interleaved throughput fits) and the table, figure and JSON it
writes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from conftest import ROOT
from test_eval_helpers import random_classifier_file


def _load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("nfe_sweep", ROOT / "experiments" / "benchmarks" / "nfe_sweep.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "nfe_sweep", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~25 s: `make test-slow`
@pytest.mark.timeout(300)
def test_tiny_sweep_writes_table_figure_and_consistent_numbers(tmp_path, monkeypatch):
    script = _load_script(monkeypatch)
    out = tmp_path / "nfe"
    classifier = random_classifier_file(tmp_path / "classifier.pt")
    threads = torch.get_num_threads()
    try:
        payload = script.main(["--tiny", "--out", str(out), "--runs", str(tmp_path / "runs"), "--threads", "1",
                               "--cache-dir", str(tmp_path / "cache"), "--classifier-weights", str(classifier)])
    finally:
        torch.set_num_threads(threads)
    table = (out / "nfe_sweep.md").read_text()
    assert (out / "nfe_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "nfe_sweep.json").read_text())["budget"]["nfes"] == [1, 2]
    assert "| model | sampler | NFE 1 | NFE 2 |" in table and "## digits: FID" in table

    for dataset, key in (("8gaussians", "energy_distance"), ("digits", "fid")):
        results = payload["quality"][dataset]
        assert set(results) == {"independent", "ot", "reflow", "meanflow"}
        for name, result in results.items():
            assert result["steps"] == (4 if dataset == "8gaussians" else 3)
            if name == "meanflow":  # k jumps of the average velocity: exactly k evaluations; no ODE, no straightness
                assert [(r["method"], r["nfe"], r["nfe_per_sample"]) for r in result["sweep"]] == [
                    ("jumps", 1, 1), ("jumps", 2, 2)]
                assert all(math.isfinite(r[key]) for r in result["sweep"])
                assert result["straightness"] is None and "experiments/" in result["config"]
                continue
            # Euler at 1 and 2 NFE, midpoint at 2 (one step): the evaluator counted exactly that many evaluations.
            assert [(r["method"], r["nfe"], r["nfe_per_sample"]) for r in result["sweep"]] == [
                ("euler", 1, 1), ("euler", 2, 2), ("midpoint", 2, 2)]
            assert all(math.isfinite(r[key]) for r in result["sweep"])
            assert len({r[f"{key}_floor"] for r in result["sweep"]}) == 1  # one floor per dataset
            assert 0 <= result["straightness_rel"] <= 1
        assert "--model.init_args.teacher_ckpt" in results["reflow"]["overrides"]
    speed = payload["throughput"]
    assert set(speed) == {"8gaussians", "digits"}
    assert set(speed["8gaussians"]) == {"independent", "ot", "reflow", "meanflow", script.INLINE_OT}
    assert "| meanflow | jumps | " in table and "- meanflow (no teacher): 1 NFE " in table
    assert all(rate > 0 for variant in speed["digits"].values() for rate in variant["rates"])
    # Every fit went through the public CLI with its printed command.
    assert all(c.startswith("lightning-flows fit --config experiments/") for c in payload["commands"])
