"""The named benchmark datasets (issue 22), read from small stand-ins of their official files that the tests write:
CelebA's aligned JPEGs and partition list, the downsampled ImageNet's npz batches. Official splits, the documented
preprocessing, and instructions where the files are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from user_data import save_image

from lightning_flows.data import DataSourceError, GenerativeDataModule


def _celeba(root, n: int = 12):
    """``n`` 178x218 faces: white in the centre 148x148 square, black around it (the crop must keep only white)."""
    folder = root / "celeba" / "img_align_celeba"
    image = np.zeros((218, 178, 3), np.uint8)
    image[35:183, 15:163] = 255
    lines = []
    for i in range(n):
        save_image(image, folder / f"{i + 1:06d}.jpg")
        lines.append(f"{i + 1:06d}.jpg {i % 3}")  # 0 train, 1 val, 2 test
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_celeba64_crops_the_centre_square_to_64_and_keeps_the_official_partition(tmp_path):
    _celeba(tmp_path)
    dm = GenerativeDataModule("celeba64", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), batch_size=2)
    assert dm.data_shape == (3, 64, 64) and dm.levels == 256 and dm.num_classes == 0
    dm.setup()
    assert (len(dm.splits.train), len(dm.splits.val), len(dm.splits.test)) == (4, 4, 4)
    assert dm.splits.test.float().mean() > 250  # only the white centre survived the crop (JPEG edges aside)


def test_celeba64_missing_or_resized_names_the_fix(tmp_path):
    missing = GenerativeDataModule("celeba64", data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"))
    assert missing.data_shape == (3, 64, 64)  # the facts need no files (a benchmark's dry run)
    with pytest.raises(DataSourceError, match=r"CelebA was not found.*--data.download true.*list_eval_partition"):
        missing.setup()
    _celeba(tmp_path)
    with pytest.raises(DataSourceError, match="celeba64 is 64x64 colour; drop --data.image_size"):
        GenerativeDataModule("celeba64", data_dir=str(tmp_path), image_size=32, cache_dir=str(tmp_path / "cache"))


def _imagenet(root, size: int = 32, batches: tuple[int, ...] = (30, 20), val: int = 10) -> dict:
    rng = np.random.default_rng(0)
    files = {}
    for name, n in [*((f"Imagenet{size}_train_npz/train_data_batch_{i + 1}.npz", n) for i, n in enumerate(batches)),
                    (f"Imagenet{size}_val_npz/val_data.npz", val)]:
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        labels = rng.integers(1, 1001, n)
        path = root / f"imagenet{size}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, data=data, labels=list(labels))  # as the official files: a plain list of labels 1..1000
        files[name] = (data, labels)
    return files


def key(rows) -> set[bytes]:
    return {np.asarray(row).tobytes() for row in rows}


def test_imagenet32_reads_the_official_batches_keeps_val_as_test_and_holds_out_n_val(tmp_path):
    files = _imagenet(tmp_path)
    dm = GenerativeDataModule("imagenet32", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), n_val=5,
                              conditional=True, batch_size=4)
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 1000
    dm.setup()
    planes = {name: data.reshape(-1, 3, 32, 32) for name, (data, _) in files.items()}  # colour planes, row-major
    val_file = "Imagenet32_val_npz/val_data.npz"
    assert key(dm.splits.test) == key(planes[val_file]) and len(dm.splits.val) == 5
    train_rows = np.concatenate([p for name, p in planes.items() if name != val_file])
    assert key(dm.splits.train) | key(dm.splits.val) == key(train_rows) and len(dm.splits.train) == 45
    label_of = {r.tobytes(): int(y) - 1 for name, (data, labels) in files.items()
                for r, y in zip(planes[name], labels)}
    assert [label_of[r.numpy().tobytes()] for r in dm.splits.test] == dm.split_labels("test").tolist()
    other = GenerativeDataModule("imagenet32", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), n_val=5,
                                 seed=1)
    other.setup()
    assert torch.equal(other.splits.test, dm.splits.test) and key(other.splits.val) != key(dm.splits.val)


def test_imagenet_missing_or_foreign_files_explain_the_licence_and_the_layout(tmp_path):
    with pytest.raises(DataSourceError, match=r"licence does not allow an automatic download.*image-net.org"):
        GenerativeDataModule("imagenet64", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")).setup()
    _imagenet(tmp_path, size=32)
    (tmp_path / "imagenet64").symlink_to(tmp_path / "imagenet32")  # 32x32 files where 64x64 ones belong
    with pytest.raises(DataSourceError, match=r"is not a downsampled ImageNet 64x64 file.*\(N, 12288\)"):
        GenerativeDataModule("imagenet64", data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache")).setup()
