"""experiments/benchmarks/evaluation_checks.py compare: the numbers behind the README's reproducibility claim."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("evaluation_checks",
                                                  ROOT / "experiments" / "benchmarks" / "evaluation_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(path: Path, fids: list[float], key: str = "k") -> Path:
    runs = [{"dataset": "digits", "model": "vae", "seed": s, "key": f"{key}{s}", "fid": f, "train_seconds": 1.0 + s,
             "bpd_discrete": 2.0} for s, f in enumerate(fids)]
    path.write_text(json.dumps({"runs": runs}))
    return path


def test_compare_counts_identical_numbers_and_scales_differences_by_the_seed_spread(tmp_path):
    check = _module().compare_check
    a = _results(tmp_path / "a.json", [10.0, 14.0])
    same = check(a, _results(tmp_path / "b.json", [10.0, 14.0]))
    assert same["runs_compared"] == 2 and same["numbers"] == same["identical"] == 4  # timings are not compared
    moved = check(a, _results(tmp_path / "c.json", [11.0, 14.0]))
    assert moved["identical"] == 3
    assert moved["largest"]["digits/fid"]["relative_to_seed_spread"] == 0.25  # 1 against a seed spread of 4
    assert check(a, _results(tmp_path / "d.json", [10.0, 14.0], key="other"))["runs_compared"] == 0
