"""Data beyond memory (issue 22): ``--data.streaming true`` converts a source once into litdata shards (cached by
content and preprocessing, built once even by concurrent processes) and streams the training split with a seeded
per-epoch shuffle and exact mid-epoch resume; val and test are the in-memory ones, example for example."""

from __future__ import annotations

import itertools
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from user_data import make_folder, make_npz

from lightning_flows.data import DataSourceError, GenerativeDataModule
from lightning_flows.data import streaming as streaming_module
from lightning_flows.data.cache import build_once

pytest.importorskip("litdata")


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def folder(tmp_path):
    return str(make_folder(tmp_path / "pets", per_class=60))


def _streamed(dataset, cache, **kwargs) -> GenerativeDataModule:
    kwargs.setdefault("batch_size", 16)
    dm = GenerativeDataModule(str(dataset), cache_dir=cache, streaming=True, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def _levels(dm, x: torch.Tensor) -> torch.Tensor:
    return (dm.to_pixels(x) * (dm.levels - 1)).round().to(torch.uint8)


def _which(served: torch.Tensor, examples: torch.Tensor) -> list[int]:
    """For each served (dequantised) example, the index of the raw example it is: levels within one of each
    other everywhere (dequantisation noise within 2**-22 * levels of 1 reads as the next level)."""
    distance = (served.flatten(1).float()[:, None] - examples.flatten(1).float()[None]).abs().amax(-1)
    best = distance.argmin(1)
    assert (distance[torch.arange(len(served)), best] <= 1).all()
    return best.tolist()


def _keys(rows: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in rows]


@pytest.mark.parametrize("kind", ["folder", "npz", "digits"])
def test_streamed_val_and_test_are_the_in_memory_splits_and_train_batches_come_from_train(tmp_path, cache, kind):
    dataset = {"folder": lambda: make_folder(tmp_path / "pets", per_class=60),
               "npz": lambda: make_npz(tmp_path / "a.npz", n=120), "digits": lambda: "digits"}[kind]()
    labelled = dict(conditional=True)
    memory = GenerativeDataModule(str(dataset), batch_size=16, cache_dir=cache, **labelled)
    memory.setup()
    streamed = _streamed(dataset, cache, **labelled)
    for split in ("val", "test"):
        assert torch.equal(streamed.splits.__dict__[split], memory.splits.__dict__[split])
        assert torch.equal(streamed.split_labels(split), memory.split_labels(split))
        assert torch.equal(streamed.split(split), memory.split(split))  # the same evaluation noise too
    loader = streamed.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == len(memory.train_dataloader())
    train, train_labels = memory.splits.train, memory.split_labels("train")
    served = _which(torch.cat([_levels(streamed, x) for x, _ in batches]), train)  # every one a training example
    assert len(set(served)) == len(served)  # no example twice in an epoch
    assert torch.equal(torch.cat([y for _, y in batches]), train_labels[served])  # with its label
    assert len(train) - len(served) < 16  # at most one incomplete batch dropped
    # The evaluation's view of the streamed train split: a spread subset of it.
    assert set(_keys(streamed.splits.train)) <= set(_keys(train))
    assert len(streamed.splits.train) == len(memory.splits.test)


def test_shards_are_built_once_and_reused_and_changed_data_gets_new_ones(tmp_path, cache, folder, monkeypatch):
    first = _streamed(folder, cache)
    written = []
    original = streaming_module._write_split
    monkeypatch.setattr(streaming_module, "_write_split", lambda *a: written.append(a[2]) or original(*a))
    again = _streamed(folder, cache, seed=0)
    assert again.shards == first.shards and written == []  # a second run reuses them
    other_seed = _streamed(folder, cache, seed=1)  # another val draw: other training examples, other shards
    assert other_seed.shards != first.shards and written == ["train", "val", "test"]
    resized = _streamed(folder, cache, image_size=8)  # other preprocessing
    assert resized.shards not in (first.shards, other_seed.shards) and resized.data_shape == (3, 8, 8)
    assert {p.name for p in Path(cache, "data", "shards").iterdir() if p.is_dir()} == {
        d.shards.name for d in (first, other_seed, resized)}  # no temporary left behind


def test_each_epoch_is_reshuffled_from_the_seed(cache, folder):
    def epochs(seed):
        loader = _streamed(folder, cache, seed=seed).train_dataloader()
        return [torch.cat(list(loader)) for _ in range(2)]

    a, b = epochs(0), epochs(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seeded: the same batches and noise
    assert not torch.equal(a[0], a[1])  # a new order (and noise) every epoch
    dm = _streamed(folder, cache)
    train = GenerativeDataModule(folder, cache_dir=cache, batch_size=16)
    train.setup()
    orders = [_which(_levels(dm, epoch), train.splits.train) for epoch in a]
    assert orders[0] != orders[1] and len(set(orders[0]) & set(orders[1])) > len(orders[0]) // 2


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [3, 6])  # mid-epoch, and at the end of the epoch (6 batches of 16)
def test_a_streamed_loader_resumes_exactly_mid_epoch_and_at_its_end(cache, folder, workers, stop_after):
    def loader():
        return _streamed(folder, cache, num_workers=workers, conditional=True).train_dataloader()

    straight_loader = loader()
    assert len(straight_loader) == 6
    straight = [batch for _ in range(3) for batch in straight_loader]
    interrupted = loader()
    iterator = iter(interrupted)
    before = [next(iterator) for _ in range(stop_after)]
    state = interrupted.state_dict()
    del iterator
    resumed = loader()
    resumed.load_state_dict(state)
    # As Lightning does: the rest of the interrupted epoch, stopping at its last batch without asking for more,
    # then the following epochs.
    rest = len(resumed) - stop_after % len(resumed) if stop_after % len(resumed) else 0
    after = list(itertools.islice(iter(resumed), rest))
    after += [batch for _ in range(3) for batch in resumed][: len(straight) - stop_after - rest]
    assert len(before) + len(after) == len(straight)
    for (x, y), (x0, y0) in zip(before + after, straight):
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_streaming_toy_data_and_missing_litdata_say_what_to_do(cache, monkeypatch):
    with pytest.raises(ValueError, match="streaming true is for image datasets"):
        GenerativeDataModule("8gaussians", streaming=True, cache_dir=cache)
    monkeypatch.setitem(__import__("sys").modules, "litdata", None)
    with pytest.raises(DataSourceError, match=r"pip install 'lightning-flows\[streaming\]'"):
        streaming_module._litdata()


def _build_slowly(final: str, log: str) -> None:
    def build(tmp: Path) -> None:
        tmp.mkdir()
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(1.0)  # long enough for the other process to arrive while this one builds
        (tmp / "done").write_text("complete")

    path = build_once(Path(final), build)
    assert (path / "done").read_text() == "complete"


def test_concurrent_first_builds_build_once_and_a_killed_build_leaves_nothing_used(tmp_path):
    final, log = tmp_path / "cache" / "entry", tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_build_slowly, args=(str(final), str(log))) for _ in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert log.read_text() == "built\n" and (final / "done").is_file()
    # A build killed half-way leaves a temporary beside the entry; the next build of that entry removes it.
    stale = final.parent / ".other.tmp-123-abc"
    stale.mkdir()
    build_once(final.parent / "other", lambda tmp: tmp.mkdir())
    assert not stale.exists() and (final.parent / "other").is_dir()


@pytest.mark.parametrize("chunk_examples", [3, None])  # chunks capped by CHUNK_BYTES; a small split's 64 chunks
def test_shard_chunks_hold_a_fixed_number_of_examples(tmp_path, cache, monkeypatch, chunk_examples):
    import json

    if chunk_examples:
        monkeypatch.setattr(streaming_module, "CHUNK_BYTES", chunk_examples * 3 * 32 * 32)
    dm = _streamed(make_npz(tmp_path / "big.npz", n=400, size=32), cache, batch_size=8)
    index = json.loads((dm.shards / "train" / "index.json").read_text())
    per_chunk = [chunk["chunk_size"] for chunk in index["chunks"]]
    count = json.loads((dm.shards / "meta.json").read_text())["counts"]["train"]
    assert sum(per_chunk) == count and set(per_chunk[:-1]) == {per_chunk[0]}
    assert per_chunk[0] == (chunk_examples or -(-count // streaming_module.MIN_CHUNKS))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_streaming_benchmark_runs_tiny(tmp_path):
    import json
    import subprocess
    import sys

    from subprocess_runs import ROOT, python_env

    result = subprocess.run([sys.executable, str(ROOT / "experiments/benchmarks/streaming.py"), "--tiny", "--workers",
                             "2", "--out", str(tmp_path)], capture_output=True, text=True, env=python_env(),
                            timeout=850)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "streaming.json").read_text())["rows"]
    assert [(r["images"], r["mode"]) for r in rows] == [(n, m) for n in (1000, 3000)
                                                        for m in ("memory", "streaming, 2 workers")]
    assert all(r["steps_per_s"] > 0 and r["steps_per_cpu_s"] > 0 and r["peak_rss_mib"] > 100 for r in rows)
    assert all(r["workers_peak_private_mib"] > 0 for r in rows if r["mode"] != "memory")  # the workers were seen
    assert "| 3,000 (9) | streaming, 2 workers |" in result.stdout
