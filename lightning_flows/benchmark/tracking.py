"""wandb for benchmark suites: every model run is a wandb run in one group named after the suite (Lightning's
``WandbLogger``, set up by the runner), its evaluation goes to that run's summary, and the final table and
sample montage go to a summary run of the same group. Works offline (``WANDB_MODE=offline``, no account)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lightning.pytorch.loggers import WandbLogger


def log_run_result(trainer, row: dict) -> None:
    """Put a run's evaluation into its wandb run's summary and close the run (the next model opens its own)."""
    import wandb

    numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update({f"benchmark/{k}": v for k, v in numbers.items()})
            if row.get("samples_png"):
                logger.experiment.summary["benchmark/weights"] = row.get("weights")
    wandb.finish()


def log_suite_table(suite, entries: Sequence[dict], figures: dict[str, Path]) -> None:
    """One summary run in the suite's group: the aggregated table as a ``wandb.Table`` plus the figures."""
    import wandb

    keys = sorted({k for e in entries for k, v in e.items() if isinstance(v, tuple)})
    table = wandb.Table(columns=["dataset", "model", "family", "seeds"] + [f"{k}_{s}" for k in keys
                                                                             for s in ("mean", "std")])
    for e in entries:
        values = []
        for k in keys:
            values += list(e[k]) if k in e else [None, None]
        table.add_data(e["dataset"], e["model"], e.get("family"), len(e["seeds"]), *values)
    run = wandb.init(project="lightning-flows", group=suite.name, name=f"{suite.name}-table", job_type="summary",
                     reinit="finish_previous")
    run.log({"benchmark/table": table, **{f"benchmark/{name}": wandb.Image(str(path))
                                          for name, path in figures.items()}})
    run.finish()
