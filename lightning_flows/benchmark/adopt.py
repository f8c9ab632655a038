"""Adopt the finished runs of an earlier report (``--adopt <report>/results.json``) into a benchmark directory.

A committed snapshot (``experiments/results/standard/``) keeps every run's result row but not its run directory.
Retraining one model against it (a new config: ``--only cnf``) would otherwise mean retraining the whole suite
to rebuild the report. Adopting a row makes it the finished run of its ``runs/<slug>``, exactly as if this
directory had trained it, under the one rule the store already applies to its own runs: a result counts for a
run only when its key, the hash of everything that defines the result (config file, arguments, seed, budget,
evaluation), equals the plan's. So a row of a model whose config changed since is never adopted (that model is
trained), and a finished run already in the directory is never replaced.

What is adopted is a result, not a model: the attempt directory holds ``result.json`` (with ``adopted_from``
naming the file and the commit that produced it, which the report repeats) and the snapshot's sample picture,
no checkpoint. The report's header names the adopted runs.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lightning_flows.benchmark.store import Holder, Store
from lightning_flows.benchmark.suite import RunPlan, SuiteError, run_slug

SAMPLES_PNG = "samples.png"


@dataclass
class Adoption:
    """What :func:`adopt_results` did: the slugs adopted, and the plans it left to training, with why."""

    adopted: list[str] = field(default_factory=list)
    not_adopted: dict[str, str] = field(default_factory=dict)  # slug -> reason

    def summary(self, path: Path) -> str:
        reasons: dict[str, int] = {}
        for reason in self.not_adopted.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        left = "; ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        return f"adopted {len(self.adopted)} finished run(s) from {path}" + (f" (not adopted: {left})" if left else "")


def read_report_rows(path: Path) -> tuple[list[dict], str]:
    """The result rows of a report's ``results.json`` and the commit that produced it; a clear error otherwise."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SuiteError(f"--adopt {path}: no such file; give the results.json of an earlier report of this "
                         f"suite (e.g. experiments/results/standard/results.json).") from None
    except (OSError, ValueError) as err:
        raise SuiteError(f"--adopt {path}: not a readable JSON report ({err}).") from None
    rows = report.get("runs") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SuiteError(f"--adopt {path}: not a benchmark report (no 'runs' list of result rows); give the "
                         f"results.json that `lightning-flows benchmark` wrote.")
    commit = str((report.get("environment") or {}).get("git_commit") or "unknown")
    return rows, commit


def adopt_results(store: Store, plans: Sequence[RunPlan], path: Path) -> Adoption:
    """Make each row of ``path`` whose slug and key equal a plan's the finished run of that plan, where the
    directory has no finished run of that key yet (see the module docstring). Runs another process holds are
    left alone."""
    path = Path(path)
    rows, commit = read_report_rows(path)
    by_slug: dict[str, dict] = {}
    for row in rows:
        if {"dataset", "model", "seed", "key"} <= row.keys():
            by_slug[run_slug(row["dataset"], row["model"], row["seed"])] = row
    adoption = Adoption()
    attempt_id = f"adopted-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    for plan in plans:
        row, key = by_slug.get(plan.slug), plan.key()
        if store.finished(plan.slug, key) is not None:
            adoption.not_adopted[plan.slug] = "already finished here"
        elif row is None:
            adoption.not_adopted[plan.slug] = "not in the file"
        elif row["key"] != key:
            adoption.not_adopted[plan.slug] = "of other settings (config, arguments or evaluation changed since)"
        else:
            claim = store.claim(plan.slug)
            if isinstance(claim, Holder):
                adoption.not_adopted[plan.slug] = "being trained by another process"
                continue
            with claim:
                attempt = claim.new_attempt(attempt_id)
                picture = path.parent / str(row.get("samples_png") or "")
                if row.get("samples_png") and picture.is_file():
                    (attempt / SAMPLES_PNG).write_bytes(picture.read_bytes())
                adopted = {**row, "adopted_from": {"file": str(path), "git_commit": commit,
                                                   "attempt": row.get("attempt")}}
                claim.commit(attempt, adopted)
            adoption.adopted.append(plan.slug)
    return adoption


def adopted_note(rows: Sequence[dict]) -> str:
    """The report header's sentence naming the runs adopted from an earlier report, or ``""``."""
    adopted = [r for r in rows if isinstance(r.get("adopted_from"), dict)]
    if not adopted:
        return ""
    sources = sorted({(r["adopted_from"].get("file", "?"), str(r["adopted_from"].get("git_commit", "?"))[:12])
                      for r in adopted})
    models = sorted({r["model"] for r in adopted})
    where = "; ".join(f"{file} (git {commit})" for file, commit in sources)
    return (f"{len(adopted)} of {len(rows)} runs ({', '.join(models)}) were not retrained for this report: their "
            f"results were adopted (`--adopt`) from {where}, whose run keys (config, arguments, seed, budget, "
            f"evaluation) equal this suite's.")
