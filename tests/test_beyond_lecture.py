"""The rows beyond the lecture (TarFlow, MeanFlow) in the measured tables: their papers' claims under the lecture's
columns, after the lecture's rows, and their likelihoods in columns of their own kinds."""

import pytest
import torch

from conftest import ROOT
from lightning_flows.benchmark.lecture import BEYOND_THE_LECTURE, LECTURE_COLUMNS, lecture_row
from lightning_flows.benchmark.suite import load_suite
from lightning_flows.benchmark.table import KIND_LABEL, LIKELIHOOD_KINDS, aggregate, dataset_table, lecture_table
from lightning_flows.models import MeanFlow, TarFlow


def _row(model, family, **numbers):
    return {"model": model, "family": family, "dataset": "digits", "seed": 0, "objective": "obj",
            "optimizer_steps": 10, "batch_size": 4, "weights": "training", **numbers}


def test_every_kind_a_family_reports_has_a_labelled_column():
    models = [TarFlow((1, 8, 8)), MeanFlow((2,)), MeanFlow((1, 16, 16), backbone={"channel_mults": [1, 2]})]
    reported = {kind for model in models for kind in model.likelihood_estimators()}
    assert reported == {"exact", "exact_noisy", "exact_instantaneous", "estimate_instantaneous"}
    assert reported <= set(LIKELIHOOD_KINDS) and set(KIND_LABEL) == set(LIKELIHOOD_KINDS)


def test_beyond_the_lecture_rows_follow_the_lecture_rows_with_their_own_claims_and_columns():
    entries = aggregate([
        _row("tarflow", "TarFlow", bpd_exact=2.1, bpd_exact_noisy=2.3, nfe_per_sample=65.0, ms_per_sample=4.0),
        _row("glow", "Glow", bpd_exact=2.2, nfe_per_sample=1.0),
        _row("meanflow", "MeanFlow", bpd_estimate_instantaneous=2.4, nfe_per_sample=1.0, fid=60.0, fid_nfe2=40.0)])
    lecture = lecture_table(entries, {"digits"})
    lines = [line for line in lecture.splitlines() if line.startswith("| ") and "measured" not in line][1:]
    assert [line.split("|")[1].strip() for line in lines] == ["Normalizing Flow (NF) (glow)",
                                                              "TarFlow (Zhai et al. 2025) (tarflow)",
                                                              "MeanFlow (Geng et al. 2025) (meanflow)"]
    assert "| beyond the lecture | Exact MLE via change-of-vars (noise-augmented data)" in lecture
    assert "2.30 bits/dim (exact, of data + N(0, sigma^2))" in lecture
    assert "2.40 bits/dim (unbiased est., ODE of u(z, t, t))" in lecture
    assert "65 NFE/sample" in lecture  # TarFlow's key limitation: its sequential steps
    assert "FID 40.0 at 2 NFE vs 60.0 at 1" in lecture  # MeanFlow's: the quality its second step buys
    header = dataset_table(entries, image=True).splitlines()[0]
    assert "bits/dim 1 draw (exact, of data + N(0, sigma^2))" in header and "bits/dim 1 draw (exact)" in header


def test_each_beyond_row_fills_every_lecture_column():
    for family in BEYOND_THE_LECTURE:
        method, source, claims = lecture_row(family)
        assert source == "beyond the lecture" and len(claims) == len(LECTURE_COLUMNS) and family in method
    assert lecture_row("Glow")[1] == "lecture"


@pytest.mark.parametrize("name", ["beyond", "beyond_10x"])
def test_beyond_suites_dry_run_every_committed_config_beside_the_families_of_the_goals(name, tmp_path, monkeypatch):
    """Their plans name the goals' references and both new families, each from its committed config, and
    every model builds and gives a finite objective on a fake batch."""
    from lightning_flows.benchmark.runner import dry_run

    monkeypatch.chdir(ROOT)
    suite = load_suite(ROOT / "experiments" / "suites" / f"{name}.yaml", ROOT)
    rows = dry_run(suite, tmp_path, [])
    by_dataset = {}
    for row in rows:
        by_dataset.setdefault(row["run"].split("/")[1], set()).add(row["family"])
        assert row["config"].startswith(str(ROOT / "experiments")), row
    assert by_dataset == {"8gaussians": {"RealNVP", "FlowMatching", "TarFlow", "MeanFlow"},
                          "digits": {"RealNVP", "Glow", "NSF", "FlowMatching", "TarFlow", "MeanFlow"}}
    budget = {"beyond": (600, 300), "beyond_10x": (6000, 3000)}[name]
    assert {(r["run"].split("/")[1], r["steps"]) for r in rows} == set(zip(("8gaussians", "digits"), budget))


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/*/tarflow.yaml"))
                         + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("experiments/*/meanflow.yaml")))
def test_every_committed_config_builds_and_gives_a_finite_objective_on_a_fake_batch(config, monkeypatch):
    """mnist5k and cifar10 included (their data is not read: the fake batch has the dataset's shape)."""
    from lightning_flows.training import build_cli

    monkeypatch.chdir(ROOT)
    cli = build_cli(["--config", config, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                     "--trainer.logger", "false"], run=False)
    assert type(cli.model).__name__ == ("TarFlow" if "tarflow" in config else "MeanFlow")
    torch.manual_seed(0)
    loss = cli.model.training_loss(torch.rand(2, *cli.datamodule.data_shape) * 2 - 1)
    assert loss.ndim == 0 and torch.isfinite(loss)
