"""Labels through the one DataModule (issue 14): ``conditional: true`` serves ``(x, y)`` batches whose labels
belong to their examples, on every loader and under DDP sharding; unlabelled data is refused clearly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from gloo_ranks import run_ranks

from lightning_flows.data import GenerativeDataModule
from lightning_flows.data.facts import MODEL_DATA_FACTS
from lightning_flows.data.registry import load_dataset


def _pixel_keys(raw: torch.Tensor) -> list[bytes]:
    return [r.contiguous().numpy().tobytes() for r in raw]


def _label_of_image(split: str) -> dict[bytes, set[int]]:
    """Raw image bytes -> the labels that image carries in ``split`` (digits has a few duplicate images)."""
    splits = load_dataset("digits")
    table: dict[bytes, set[int]] = {}
    for key, label in zip(_pixel_keys(getattr(splits, split)), getattr(splits, f"{split}_labels").tolist()):
        table.setdefault(key, set()).add(label)
    return table


def _levels(dm: GenerativeDataModule, x: torch.Tensor) -> torch.Tensor:
    return (dm.to_pixels(x) * (dm.levels - 1)).round().to(torch.uint8)


def test_conditional_batches_carry_their_own_labels_on_every_loader():
    dm = GenerativeDataModule("digits", batch_size=64, eval_batch_size=50, conditional=True)
    assert dm.num_classes == 10 and GenerativeDataModule("digits").num_classes == 0
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()),
                          ("test", dm.test_dataloader())):
        table = _label_of_image(split)
        batches = list(loader)
        assert all(isinstance(b, tuple) and len(b) == 2 for b in batches)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        assert y.dtype == torch.int64 and x.shape[0] == y.shape[0]
        assert all(label in table[key] for key, label in zip(_pixel_keys(_levels(dm, x)), y.tolist()))
        if split != "train":  # fixed order: the whole split with its labels
            assert torch.equal(y, dm.split_labels(split)) and torch.equal(x, dm.split(split))
    # The unconditional DataModule serves the same examples, unlabelled (and the same noise).
    plain = GenerativeDataModule("digits", batch_size=64, eval_batch_size=50)
    assert torch.equal(torch.cat(list(plain.val_dataloader())), dm.split("val"))
    assert torch.equal(next(iter(plain.train_dataloader())), next(iter(dm.train_dataloader()))[0])


def test_labelled_loader_resumes_with_the_same_batches_and_labels():
    dm = GenerativeDataModule("digits", batch_size=64, conditional=True)
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = next(it)
    resumed = GenerativeDataModule("digits", batch_size=64, conditional=True).train_dataloader()
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_conditional_on_unlabelled_data_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="conditional: false"):
        GenerativeDataModule("8gaussians", conditional=True)
    with pytest.raises(ValueError, match="no class labels"):
        GenerativeDataModule("moons").split_labels("train")


def test_num_classes_is_a_linked_data_fact():
    assert MODEL_DATA_FACTS["num_classes"] == "num_classes"


def test_split_labels_cover_every_split():
    dm = GenerativeDataModule("digits")
    for split in ("train", "val", "test"):
        labels = dm.split_labels(split)
        assert labels.dtype == torch.int64 and len(labels) == len(dm.split(split))
        assert set(labels.tolist()) == set(range(10))


def _shard_worker(rank: int, world: int, out: str) -> None:
    dm = GenerativeDataModule("digits", batch_size=32, eval_batch_size=25, conditional=True)
    result = {}
    for split, loader in (("train", dm.train_dataloader()), ("test", dm.test_dataloader())):
        batches = list(loader)
        result[split] = (len(batches), torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    torch.save(result, f"{out}/rank{rank}.pt")


def test_two_gloo_ranks_shard_labelled_batches_disjointly_and_completely(tmp_path):
    run_ranks(_shard_worker, str(tmp_path), directory=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    dm = GenerativeDataModule("digits", conditional=True)
    for split in ("train", "test"):
        assert ranks[0][split][0] == ranks[1][split][0]  # equal batch counts keep DDP in lockstep
        table = _label_of_image(split)
        keys = [_pixel_keys(_levels(dm, r[split][1])) for r in ranks]
        for key_list, r in zip(keys, ranks):
            assert all(label in table[k] for k, label in zip(key_list, r[split][2].tolist()))
    # test: every example exactly once over the two ranks, with its label
    x = torch.cat([r["test"][1] for r in ranks])
    y = torch.cat([r["test"][2] for r in ranks])
    order = torch.cat([torch.arange(len(dm.split("test")))[r::2] for r in range(2)])
    assert torch.equal(x, dm.split("test")[order]) and torch.equal(y, dm.split_labels("test")[order])
    # train: the ranks' shards are disjoint (no example index twice), the labels follow the examples
    n_train = len(dm.split("train"))
    assert sum(len(r["train"][2]) for r in ranks) == (n_train // 2) // 32 * 32 * 2
    available = Counter(_pixel_keys(load_dataset("digits").train))
    served = Counter(k for r in ranks for k in _pixel_keys(_levels(dm, r["train"][1])))
    assert all(count <= available[key] for key, count in served.items())  # no example served twice
