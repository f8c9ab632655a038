"""The recipe sweep (experiments/benchmarks/recipe_sweep.py): its recipe tokens, the budget-relative EMAs it
compares (and the half-life the EMA callback's warm-up implies), and a tiny sweep on 8 Gaussians through the
shared evaluator: one training run per recipe, every EMA scored on that run, reruns skip finished rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from lightning_flows.callbacks.ema import warmed_up_decay


@pytest.fixture()
def sweep(monkeypatch):
    spec = importlib.util.spec_from_file_location("recipe_sweep",
                                                  ROOT / "experiments" / "benchmarks" / "recipe_sweep.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "recipe_sweep", script)
    spec.loader.exec_module(script)
    return script


def update_weights(decays: list[float]) -> torch.Tensor:
    """The weight of each update's parameters in the average: ``(1 - d_k) prod_{j > k} d_j`` (the initial
    weights' share, ``prod d_k``, is left out: the warm-up's first decay is 0.1)."""
    weights, later = [], 1.0
    for d in reversed(decays):
        weights.append((1.0 - d) * later)
        later *= d
    return torch.tensor(weights[::-1], dtype=torch.float64)


def share_of_last(weights: torch.Tensor, fraction: float) -> float:
    return (weights[-round(fraction * len(weights)):].sum() / weights.sum()).item()


@pytest.mark.parametrize("n", [300, 3000])
def test_the_warm_up_is_a_budget_relative_average_with_a_half_life_of_8_percent_of_the_run(n):
    """Below its cap the warmed-up decay ``(1 + n) / (10 + n)`` halves a weight in ``ln 2 / 9 = 7.7%`` of the
    updates so far and weighs update k like k^8, so half the average is the last ``1 - 0.5^(1/9) = 7.4%`` of the
    updates, at any budget (ema.py's docstring)."""
    assert warmed_up_decay(0.9999, n) ** (math.log(2) / 9 * n) == pytest.approx(0.5, abs=0.01)
    weights = update_weights([warmed_up_decay(0.9999, k) for k in range(n)])
    assert share_of_last(weights, 1 - 0.5 ** (1 / 9)) == pytest.approx(0.5, abs=0.015)
    # 0.999 and 0.9999 are the same average until (1 + n) / (10 + n) reaches 0.999 (~9,000 updates)
    assert torch.equal(weights, update_weights([warmed_up_decay(0.999, k) for k in range(n)]))


def test_a_half_life_ema_halves_a_weight_in_a_fixed_fraction_of_the_run_so_far(sweep):
    ema = sweep.SweptEMA("halflife:0.2", half_life=0.2)
    for n in range(1000):
        assert ema.current_decay() ** (0.2 * (n + 1)) == pytest.approx(0.5, rel=1e-12)
        ema.num_updates += 1
    assert ema.state_key == "SweptEMA[halflife:0.2]" and not ema.use_for_eval


def test_recipe_tokens_become_fit_arguments(sweep):
    assert sweep.recipe_arguments("config") == []
    assert sweep.recipe_arguments("cosine+warmup30+clip1") == [
        "--model.init_args.lr_schedule", "cosine", "--model.init_args.warmup_steps", "30",
        "--trainer.gradient_clip_val", "1.0"]
    with pytest.raises(SystemExit, match="unknown recipe token 'adam'"):
        sweep.recipe_arguments("constant+adam")
    with pytest.raises(SystemExit, match="unknown EMA 'power:3'"):
        sweep.swept_ema("power:3")


@pytest.mark.timeout(240)
def test_tiny_sweep_scores_every_ema_on_one_run_per_recipe_and_skips_finished_rows(sweep, tmp_path):
    suite = {"name": "tiny", "seeds": [0], "models": ["glow"],
             "datasets": {"8gaussians": {"configs": str(ROOT / "experiments" / "toy2d"), "steps": 6,
                                         "batch_size": 64,
                                         "evaluation": {"n_samples": 200, "max_likelihood_examples": 200}}},
             "evaluation": {"sample_batch_size": 200, "likelihood_batch_size": 200},
             "trainer": {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_model_summary": False}}
    suite_file = tmp_path / "tiny.yaml"
    suite_file.write_text(yaml.safe_dump(suite))
    out = tmp_path / "sweep"
    threads = torch.get_num_threads()
    args = ["--suite", str(suite_file), "--dataset", "8gaussians", "--model", "realnvp", "--recipes", "config",
            "constant+clip1", "--emas", "none", "decay:0.9999", "halflife:0.5", "--likelihood-for", "none",
            "--out", str(out)]
    try:
        sweep.main(args)  # realnvp is not in the suite: it trains from the suite's toy2d configs
        rows = {(r["recipe"], r["ema"]): r for r in (json.loads(p.read_text()) for p in out.glob("*.json"))}
        assert set(rows) == {(r, e) for r in ("config", "constant+clip1") for e in ("none", "decay:0.9999",
                                                                                     "halflife:0.5")}
        for (recipe, ema), row in rows.items():
            assert row["global_step"] == 6 and row["model"] == "realnvp" and math.isfinite(row["energy_distance"])
            assert ("--trainer.gradient_clip_val 1.0" in row["command"]) == (recipe == "constant+clip1")
            assert ("nll_gap_exact" in row) == (ema == "none")  # --likelihood-for none
            assert row["weights"] == ("training" if ema == "none" else "ema")
        # The averages ride along on one run: the training weights differ from both averages.
        for recipe in ("config", "constant+clip1"):
            scores = {rows[recipe, e]["energy_distance"] for e in ("none", "decay:0.9999", "halflife:0.5")}
            assert len(scores) == 3
        table = (out / "recipe_sweep.md").read_text()
        assert "| realnvp | 6 x 64 | constant+clip1 | halflife:0.5 | 0 |" in table
        finished = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
        sweep.main(args)  # nothing left to run: no row is rewritten
        assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == finished
    finally:
        torch.set_num_threads(threads)
