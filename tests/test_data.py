"""Datasets, splits, dequantisation and the in-memory batch loader."""

import math
import struct

import pytest
import torch

from lightning_flows.data import DATASET_INFO, GenerativeDataModule, load_dataset
from lightning_flows.data import loader as loader_module
from lightning_flows.data.toy2d import TOY_LOG_DENSITIES, TOY_SAMPLERS

EMBEDDED = {"digits": ((1, 8, 8), 17, (1437, 180, 180)), "mnist5k": ((1, 28, 28), 256, (4000, 500, 500))}


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_image_datasets_load_with_shapes_ranges_and_splits(name):
    shape, levels, sizes = EMBEDDED[name]
    splits = load_dataset(name, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == sizes
    for part in (splits.train, splits.val, splits.test):
        assert tuple(part.shape[1:]) == shape
        assert part.min() >= 0 and part.max() <= levels - 1
    assert splits.train.max() == levels - 1  # the full range is used
    dm = GenerativeDataModule(name, batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (32, *shape) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() < 1


@pytest.mark.parametrize("name", sorted(TOY_SAMPLERS))
def test_toy_datasets_have_fixed_split_sizes_and_are_deterministic(name):
    a, b = load_dataset(name, seed=3), load_dataset(name, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (20_000, 2_000, 5_000)
    assert a.train.shape == (20_000, 2) and torch.isfinite(a.train).all()
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, load_dataset(name, seed=4).train)


def test_splits_are_disjoint_and_deterministic():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    assert torch.equal(a.test, b.test)
    flat = lambda t: {tuple(row.tolist()) for row in t.flatten(1)}  # noqa: E731
    # The digits set has a few exact duplicate images, so compare sizes rather than demand no overlap.
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert len(flat(a.val) & flat(a.test)) <= 2


@pytest.mark.parametrize("n, n_val, n_test", [(1797, 180, 180), (5000, 500, 500), (30, 5, 7)])
def test_test_split_is_the_same_for_every_data_seed_and_disjoint_from_train_and_val(n, n_val, n_test):
    """The evaluation reference (test) never meets any seed's training data, nor the feature classifier's
    (trained on the seed-0 training split), and seed 0 keeps the splits it always had."""
    from lightning_flows.data.registry import _split_indices

    train0, val0, test0 = _split_indices(n, n_val, n_test, seed=0)
    legacy = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(val0, legacy[:n_val]) and torch.equal(test0, legacy[n_val:n_val + n_test])
    assert torch.equal(train0, legacy[n_val + n_test:])
    for seed in range(1, 6):
        train, val, test = _split_indices(n, n_val, n_test, seed)
        assert torch.equal(test, test0)
        assert (len(train), len(val)) == (n - n_val - n_test, n_val)
        assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(n))  # a partition
        assert not torch.equal(train, train0)  # the seed still reshuffles train/val


def test_digits_test_images_are_the_same_for_every_data_seed():
    reference = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=3)
    assert torch.equal(reference.test, other.test) and torch.equal(reference.test_labels, other.test_labels)
    assert not torch.equal(reference.val, other.val)


@pytest.mark.parametrize("name", sorted(TOY_LOG_DENSITIES))
def test_toy_true_log_densities_integrate_to_one(name):
    n = 1601  # grid on [-6, 6]^2
    axis = torch.linspace(-6, 6, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    density = TOY_LOG_DENSITIES[name](torch.stack([xx.flatten(), yy.flatten()], 1)).double().exp()
    cell = (axis[1] - axis[0]).item() ** 2
    assert density.sum().item() * cell == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize("name", sorted(TOY_LOG_DENSITIES))
def test_toy_samples_lie_where_the_density_is_positive(name):
    x = TOY_SAMPLERS[name](2000, torch.Generator().manual_seed(0))
    assert torch.isfinite(TOY_LOG_DENSITIES[name](x)).all()


def test_unknown_dataset_name_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown dataset 'mnsit'.*mnist5k"):
        GenerativeDataModule("mnsit")


def test_torchvision_dataset_missing_with_download_off_names_path_and_option(tmp_path):
    dm = GenerativeDataModule("cifar10", data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "--data.download true" in message


def _write_idx(path, array: torch.Tensor, magic: int):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for size in array.shape:
            f.write(struct.pack(">I", size))
        f.write(array.to(torch.uint8).numpy().tobytes())


def test_mnist_loads_from_local_idx_files(tmp_path):
    # The real torchvision path, fed by files in MNIST's own format.
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=gen), 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=gen), 0x801)
    dm = GenerativeDataModule("mnist", data_dir=str(tmp_path), n_val=10, batch_size=8)
    dm.setup()
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (50, 10, 20)
    assert next(iter(dm.train_dataloader())).shape == (8, 1, 28, 28)


def test_dequantise_and_to_pixels_round_trip():
    dm = GenerativeDataModule("digits")
    k = torch.arange(17).float().reshape(1, 1, 1, 17)
    for noise in (torch.zeros_like(k), torch.full_like(k, 0.999)):
        x = dm.dequantise(k, noise)
        assert x.min() >= -1 and x.max() < 1
        assert torch.allclose(dm.to_pixels(x) * 16, k)


def test_eval_batches_are_fixed_and_train_batches_are_fresh():
    dm = GenerativeDataModule("digits", batch_size=64)
    val_a = torch.cat(list(dm.val_dataloader()))
    val_b = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(val_a, val_b) and torch.equal(val_a, dm.split("val"))
    loader = dm.train_dataloader()
    first, second = next(iter(loader)), next(iter(loader))
    assert not torch.equal(first, second)  # new epoch: new order and new dequantisation noise


@pytest.mark.parametrize("drop_last,n", [(True, 103), (False, 103), (False, 101)])
def test_loader_shards_ranks_evenly_without_repeats(monkeypatch, drop_last, n):
    data = torch.arange(n)
    seen, counts = [], []
    for rank in range(2):
        monkeypatch.setattr(loader_module, "_rank_and_world", lambda rank=rank: (rank, 2))
        batches = loader_module.InMemoryBatches(data, 10, lambda raw, idx, gen: raw, shuffle=True,
                                                drop_last=drop_last, seed=0)
        out = list(batches)
        assert len(out) == len(batches)
        counts.append(len(out))
        seen.append(torch.cat(out))
    assert counts[0] == counts[1]  # equal step counts keep DDP's collectives in lockstep
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    if not drop_last:
        assert sorted(torch.cat(seen).tolist()) == list(range(n))


def test_dataset_info_matches_loaded_shapes():
    for name in ("digits", "8gaussians"):
        assert tuple(load_dataset(name).train.shape[1:]) == DATASET_INFO[name].shape
    assert DATASET_INFO["cifar10"].dim == 3 * 32 * 32 and math.log2(DATASET_INFO["cifar10"].levels) == 8
