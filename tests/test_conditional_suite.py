"""The conditional benchmark suite names every conditional-capable family's digits config (issue 14)."""

from __future__ import annotations

import yaml

from conftest import ROOT
from lightning_flows.benchmark.suite import load_suite

SUITE = ROOT / "experiments" / "suites" / "conditional.yaml"
FAMILIES = ("vae", "gan", "realnvp", "glow", "nsf", "cnf", "diffusion", "flow_matching")


def test_conditional_suite_lists_every_family_and_its_configs_are_conditional():
    raw = yaml.safe_load(SUITE.read_text())
    assert sorted(raw["models"]) == sorted(f"{family}_conditional" for family in FAMILIES)
    for model in raw["models"]:
        config = ROOT / "experiments" / "digits" / f"{model}.yaml"
        assert yaml.safe_load(config.read_text())["data"]["conditional"] is True, config
    suite = load_suite(SUITE, ROOT)
    assert len(suite.runs) == len(FAMILIES) and all(r.evaluation.guidance == 1.0 for r in suite.runs)


def test_conditional_suite_dry_run_builds_every_model_and_pushes_a_labelled_batch(tmp_path, monkeypatch):
    from lightning_flows.benchmark.runner import dry_run

    monkeypatch.chdir(ROOT)
    rows = dry_run(load_suite(SUITE, ROOT), tmp_path, [])
    assert {row["family"] for row in rows} == {"VAE", "GAN", "RealNVP", "Glow", "NSF", "CNF", "Diffusion",
                                                 "FlowMatching"}
