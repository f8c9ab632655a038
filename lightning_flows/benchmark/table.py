"""Write benchmark rows as results.json, table.csv and table.md (the lecture's comparison, measured)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

# (key, header, format) in display order; a row without the key shows "-".
COLUMNS: Sequence[tuple[str, str, str]] = (
    ("run", "run", "{}"),
    ("family", "family", "{}"),
    ("dataset", "dataset", "{}"),
    ("likelihood", "likelihood", "{}"),
    ("params", "params", "{:,}"),
    ("train_steps", "train steps", "{:,}"),
    ("train_seconds", "train s", "{:.0f}"),
    ("test_loss", "test loss", "{:.4f}"),
    ("test_nll_nats", "test NLL (nats)", "{:.3f}"),
    ("true_entropy_nats", "true H (nats)", "{:.3f}"),
    ("nll_gap_nats", "NLL gap (nats)", "{:+.3f}"),
    ("test_bpd", "test bits/dim", "{:.3f}"),
    ("energy_distance", "energy dist.", "{:.4f}"),
    ("energy_distance_floor", "ED floor", "{:.4f}"),
    ("nfe_per_sample", "NFE/sample", "{}"),
    ("ms_per_sample", "ms/sample", "{:.3f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown_table(rows: Sequence[dict]) -> str:
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(rows: Sequence[dict], out_dir: str | Path, preamble: str = "") -> Path:
    """Write the three files to ``out_dir`` and return the path of table.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(list(rows), indent=2, default=str) + "\n")
    keys = [k for k, _, _ in COLUMNS] + sorted({k for r in rows for k in r} - {k for k, _, _ in COLUMNS})
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    table = out / "table.md"
    table.write_text((preamble + "\n\n" if preamble else "") + markdown_table(rows))
    return table
