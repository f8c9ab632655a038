"""The commands README.md tells users to type do what it says (run from the README's own text)."""

from __future__ import annotations

import glob
import re
import shlex

import pytest
from subprocess_runs import ROOT

from lightning_flows.cli import main

# Keep the README's digits run to one small step: the command is the README's, the budget is a test's.
TINY = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--sample_grid.n", "0",
        "--model.init_args.base_channels", "8", "--model.init_args.channel_mults", "[1, 2]",
        "--model.init_args.sampler.steps", "2"]


def _bash_block_after(heading: str) -> list[str]:
    """The commands of the first ```bash block under ``heading`` in README.md, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.split("#", 1)[0].strip() for line in joined.splitlines() if line.split("#", 1)[0].strip()]


@pytest.fixture
def finish_wandb():
    import wandb

    wandb.finish()
    wandb.teardown()
    yield
    wandb.finish()
    wandb.teardown()


def test_readme_offline_wandb_commands_sync_the_run_they_wrote(tmp_path, monkeypatch, finish_wandb):
    commands = _bash_block_after("## Logging to wandb")
    (fit,) = [c for c in commands if c.startswith("WANDB_MODE=offline lightning-flows fit")]
    (sync,) = [c for c in commands if c.startswith("wandb sync")]
    env, program, *args = shlex.split(fit)
    assert program == "lightning-flows" and env == "WANDB_MODE=offline"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    args = [str(ROOT / a) if a.startswith("experiments/") else a for a in args]
    main([*args, *TINY])
    (written,) = tmp_path.glob("**/offline-run-*")
    (pattern,) = shlex.split(sync)[2:]
    assert [tmp_path / p for p in glob.glob(pattern)] == [written], (pattern, written)
