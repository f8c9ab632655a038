"""User data in (issue 22): folders of images and .npz files through the one DataModule: facts known before
loading, resizing, content-based splits that are seeded, disjoint, fixed for test and stable when files are
added, the split manifest, and every bad input with a message that names the fix."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from user_data import make_folder, make_npz, pixels, save_image

from lightning_flows.data import DataSourceError, GenerativeDataModule, dataset_info
from lightning_flows.data.images import resize_shorter_side_and_crop
from lightning_flows.data.splits import assign_splits, digest


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _rows(tensor: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in tensor}


def _module(dataset, cache, **kwargs) -> GenerativeDataModule:
    dm = GenerativeDataModule(str(dataset), batch_size=kwargs.pop("batch_size", 8), cache_dir=cache, **kwargs)
    dm.setup()
    return dm


# ---- facts, shapes, labels ----
def test_a_labelled_folder_serves_its_images_with_their_class_labels(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=30)
    dm = GenerativeDataModule(str(root), cache_dir=cache, conditional=True, batch_size=8)
    # The facts a model is built from, before anything is decoded.
    assert (dm.data_shape, dm.levels, dm.num_classes) == ((3, 12, 12), 256, 2) and dm.splits is None
    dm.setup()
    files = {f"{c}/{i:04d}.png": pixels(30, seed=k)[i].transpose(2, 0, 1).tobytes()
             for k, c in enumerate(("cat", "dog")) for i in range(30)}
    label_of = {image: label for name, image in files.items() for label in [name.startswith("dog")]}
    served = 0
    for split in ("train", "val", "test"):
        images, labels = getattr(dm.splits, split), dm.split_labels(split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 12, 12)
        assert [label_of[row.numpy().tobytes()] for row in images] == labels.tolist()
        served += len(images)
    assert served == 60 and set.union(*(_rows(getattr(dm.splits, s)) for s in ("train", "val", "test"))) == \
        set(files.values())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 12, 12) and -1 <= x.min() and x.max() < 1 and y.dtype == torch.int64


def test_a_flat_folder_is_unlabelled_and_grey_images_give_one_channel(tmp_path, cache):
    root = make_folder(tmp_path / "flat", per_class=20, classes=(), channels=1)
    dm = GenerativeDataModule(str(root), cache_dir=cache)
    assert dm.data_shape == (1, 12, 12) and dm.num_classes == 0
    with pytest.raises(ValueError, match="needs class labels"):
        GenerativeDataModule(str(root), cache_dir=cache, conditional=True)
    assert GenerativeDataModule(str(root), cache_dir=cache, image_channels=3).data_shape == (3, 12, 12)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("compressed", [False, True])
def test_an_npz_in_either_layout_stored_or_compressed_serves_the_same_examples(tmp_path, cache, layout, compressed):
    reference = _module(make_npz(tmp_path / "ref.npz", n=60), cache, conditional=True)
    dm = _module(make_npz(tmp_path / f"{layout}{compressed}.npz", n=60, layout=layout, compressed=compressed), cache,
                 conditional=True)
    assert dm.data_shape == (3, 12, 12) and dm.num_classes == 2
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(dm.splits, split), getattr(reference.splits, split))
        assert torch.equal(dm.split_labels(split), getattr(reference.splits, f"{split}_labels"))
    every = torch.from_numpy(pixels(60).transpose(0, 3, 1, 2).copy())
    assert _rows(torch.cat([getattr(dm.splits, s) for s in ("train", "val", "test")])) == _rows(every)


def test_grey_npz_without_channel_axis(tmp_path, cache):
    dm = _module(make_npz(tmp_path / "grey.npz", n=40, layout="NHW", labels=False), cache)
    assert dm.data_shape == (1, 12, 12) and dm.num_classes == 0


# ---- image_size and channels ----
def test_box_halving_averages_each_2x2_block_and_the_crop_is_central():
    from PIL import Image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    halved = np.asarray(resize_shorter_side_and_crop(Image.fromarray(array), 8), dtype=np.float64)
    blocks = array.reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert np.abs(halved - blocks).max() <= 1  # the mean, to PIL's fixed-point rounding
    assert np.abs(halved - blocks).mean() < 0.6
    wide = np.zeros((8, 24), np.uint8)
    wide[:, 8:16] = 255  # the centre square is white, the sides black
    assert (np.asarray(resize_shorter_side_and_crop(Image.fromarray(wide), 8)) == 255).all()


def test_image_size_resizes_mixed_sizes_and_channels_converts(tmp_path, cache):
    root = tmp_path / "mixed"
    save_image(pixels(1, size=12)[0], root / "a.png")
    save_image(pixels(1, size=20, seed=1)[0], root / "b.png")
    save_image(np.full((30, 18, 3), 200, np.uint8), root / "c.jpg")
    with pytest.raises(DataSourceError, match=r"3 sizes: 12x12.*--data.image_size N"):
        GenerativeDataModule(str(root), cache_dir=cache)
    dm = _module(root, cache, image_size=8, image_channels=1, test_fraction=0.5, val_fraction=0.0)
    assert dm.data_shape == (1, 8, 8)
    rows = torch.cat([dm.splits.train, dm.splits.test])
    assert rows.shape == (3, 1, 8, 8)
    assert any((row == 200).all() for row in rows)  # the uniform JPEG stays uniform (grey of 200,200,200)


# ---- splits ----
def test_splits_are_disjoint_seeded_and_the_test_split_is_the_same_for_every_seed(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=100)
    by_seed = {seed: _module(root, cache, seed=seed, val_fraction=0.1, test_fraction=0.2) for seed in (0, 1)}
    for dm in by_seed.values():
        train, val, test = (_rows(getattr(dm.splits, s)) for s in ("train", "val", "test"))
        assert not (train & val or train & test or val & test) and len(train | val | test) == 200
        assert 20 <= len(test) <= 60 and 5 <= len(val) <= 40  # binomial around 40 and 20
    assert torch.equal(by_seed[0].splits.test, by_seed[1].splits.test)
    assert _rows(by_seed[0].splits.val) != _rows(by_seed[1].splits.val)
    again = _module(root, cache, seed=0, val_fraction=0.1, test_fraction=0.2)
    assert all(torch.equal(getattr(again.splits, s), getattr(by_seed[0].splits, s)) for s in ("train", "val", "test"))


def test_added_files_never_move_an_example_to_another_split_and_duplicates_share_one(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=40)
    before = _module(root, cache)
    for i, image in enumerate(pixels(30, seed=7)):
        save_image(image, root / "cat" / f"new{i}.png")
    save_image(pixels(30, seed=0)[3], root / "dog" / "copy_of_cat_3.png")  # the same pixels, the same PNG bytes
    after = _module(root, cache)
    for split in ("train", "val", "test"):
        assert _rows(getattr(before.splits, split)) <= _rows(getattr(after.splits, split))
    assert len(after.splits.train) + len(after.splits.val) + len(after.splits.test) == 111
    codes = assign_splits(np.frombuffer(digest(b"x") * 2, np.uint8).reshape(2, 16), 0, 0.1, 0.2)
    assert codes[0] == codes[1]  # equal content, equal split


def test_the_run_manifest_reproduces_the_splits_after_files_were_added(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=40)
    from lightning_flows.data.splits import write_manifest

    first = GenerativeDataModule(str(root), cache_dir=cache)
    first.setup()
    catalogue = first.catalogue
    manifest = write_manifest(tmp_path / "data_splits.csv", catalogue.names, catalogue.digests, catalogue.codes,
                              catalogue.labels, catalogue.class_names)
    assert manifest.read_text().splitlines()[0] == "name,digest,split,label"
    assert "cat/0000.png," in manifest.read_text() and manifest.read_text().count("\n") == 81
    for i, image in enumerate(pixels(20, seed=9)):
        save_image(image, root / "dog" / f"later{i}.png")
    rerun = _module(root, cache, splits=str(manifest))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(rerun.splits, split), getattr(first.splits, split))
    (root / "cat" / "0000.png").unlink()
    with pytest.raises(DataSourceError, match="1 example.*not in the data any more"):
        GenerativeDataModule(str(root), cache_dir=cache, splits=str(manifest)).setup()


# ---- bad input: one clear message each ----
def _error(dataset, cache, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        GenerativeDataModule(str(dataset), cache_dir=cache, **kwargs).setup()
    return str(info.value)


def test_missing_path_and_empty_or_imageless_folders_name_the_fix(tmp_path, cache):
    assert "no such file or directory" in _error(tmp_path / "nowhere", cache)
    assert "no such file" in _error(tmp_path / "nowhere.npz", cache)
    (tmp_path / "empty").mkdir()
    assert "holds no images" in _error(tmp_path / "empty", cache)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures")
    assert "holds no images" in _error(tmp_path / "notes", cache)
    (tmp_path / "notes.txt").write_text("x")
    assert "not an .npz" in _error(tmp_path / "notes.txt", cache)
    assert "Unknown dataset 'cifar100'" in _error("cifar100", cache)


def test_images_beside_class_folders_are_refused(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=3)
    save_image(pixels(1)[0], root / "stray.png")
    assert "both at its top level (stray.png" in _error(root, cache)


def test_a_corrupt_image_is_named(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=5)
    (root / "dog" / "0003.png").write_bytes(b"\x89PNG not really")
    assert "dog/0003.png is not a readable image" in _error(root, cache)
    # A file whose header reads but whose pixels are cut off is named when decoded.
    whole = (root / "cat" / "0001.png").read_bytes()
    (root / "dog" / "0003.png").write_bytes(whole[: len(whole) // 2])
    assert "dog/0003.png cannot be decoded" in _error(root, cache, image_size=8, image_channels=3)


@pytest.mark.parametrize("arrays, message", [
    ({"pictures": np.zeros((4, 8, 8), np.uint8)}, r"no 'images' array \(it has: pictures\)"),
    ({"images": np.zeros((4, 8, 8), np.float32)}, "dtype float32, expected uint8"),
    ({"images": np.zeros((4, 8, 8, 5), np.uint8)}, r"shape \(4, 8, 8, 5\).*C = 1 or 3"),
    ({"images": np.zeros((4, 64), np.uint8)}, r"shape \(4, 64\)"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(3, np.int64)}, "3 labels for 4 images"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.zeros(4, np.float32)}, "1-D integer array"),
    ({"images": np.zeros((4, 8, 8), np.uint8), "labels": -np.ones(4, np.int64)}, "labels must be class numbers"),
])
def test_bad_npz_files_say_what_to_save(tmp_path, cache, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert pytest.raises(DataSourceError, GenerativeDataModule, str(path), cache_dir=cache).match(message)


def test_not_a_zip_and_bad_options(tmp_path, cache):
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in _error(tmp_path / "broken.npz", cache)
    npz = make_npz(tmp_path / "ok.npz")
    assert "--data.image_channels must be 1 or 3" in _error(npz, cache, image_channels=2)
    assert "val_fraction + test_fraction < 1" in _error(npz, cache, val_fraction=0.5, test_fraction=0.5)
    assert "apply to folders" in _error("digits", cache, image_size=16)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_cache_directory_names_the_option(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=3)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert "Pass a writable directory with --data.cache_dir" in _error(root, str(locked / "cache"))
    finally:
        locked.chmod(0o700)


def test_an_unwritable_cache_path_names_the_option(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=3)
    blocker = tmp_path / "a_file"
    blocker.write_text("the cache cannot be made inside a file")
    assert "Pass a writable directory with --data.cache_dir" in _error(root, str(blocker / "cache"))


def test_dataset_info_takes_paths_with_their_options(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=3, size=16)
    assert dataset_info(str(root), image_size=8, cache_dir=cache).shape == (3, 8, 8)
    assert dataset_info("digits").shape == (1, 8, 8)


def test_a_checkpoint_of_other_training_examples_warns_on_resume(tmp_path, cache):
    root = make_folder(tmp_path / "pets", per_class=20)
    state = GenerativeDataModule(str(root), cache_dir=cache).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerativeDataModule(str(root), cache_dir=cache).load_state_dict(state)  # the same data: silent
    for i, image in enumerate(pixels(10, seed=5)):
        save_image(image, root / "cat" / f"added{i}.png")
    with pytest.warns(UserWarning, match="--data.splits <run dir>/data_splits.csv"):
        GenerativeDataModule(str(root), cache_dir=cache).load_state_dict(state)
    with pytest.warns(UserWarning, match="differ from those this checkpoint was trained on"):
        GenerativeDataModule("digits").load_state_dict(state)  # resumed on a registered dataset: no KeyError
