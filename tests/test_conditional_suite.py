"""The conditional benchmark suite names every conditional-capable family's digits config (issue 14)."""

from __future__ import annotations

import yaml

from conftest import ROOT
from lightning_flows.benchmark.suite import load_suite

SUITE = ROOT / "experiments" / "suites" / "conditional.yaml"
FAMILIES = ("vae", "gan", "realnvp", "glow", "nsf", "diffusion", "flow_matching")


def test_conditional_suite_lists_every_family_and_its_configs_are_conditional():
    raw = yaml.safe_load(SUITE.read_text())
    assert sorted(raw["models"]) == sorted(f"{family}_conditional" for family in FAMILIES)
    configs = [ROOT / "experiments" / "digits" / f"{model}.yaml" for model in raw["models"]]
    # flow matching's and diffusion's configs live here; the other families' come with their conditional models
    for config in configs:
        if config.is_file():
            assert yaml.safe_load(config.read_text())["data"]["conditional"] is True, config
    assert all(c.is_file() for c in configs if c.stem.startswith(("flow_matching", "diffusion")))
    if all(c.is_file() for c in configs):
        suite = load_suite(SUITE, ROOT)
        assert len(suite.runs) == len(FAMILIES) and all(r.evaluation.guidance == 1.0 for r in suite.runs)
