"""Small user datasets made by the tests themselves: folders of PNG/JPEG files, .npz files, stand-ins for the
official CelebA and downsampled ImageNet files. Procedural pixels (seeded), never real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pixels(n: int, size: int = 12, channels: int = 3, seed: int = 0) -> np.ndarray:
    """``(n, size, size, channels)`` uint8: a class-free smooth pattern plus noise, distinct per example."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, 1, size)
    base = (grid[:, None] + grid[None, :])[None, :, :, None] * rng.uniform(40, 200, (n, 1, 1, channels))
    return np.clip(base + rng.integers(0, 50, (n, size, size, channels)), 0, 255).astype(np.uint8)


def save_image(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
    return path


def make_folder(root: Path, per_class: int = 20, classes: tuple[str, ...] = ("cat", "dog"), size: int = 12,
                channels: int = 3, seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` (or flat ``root/<i>.png`` when ``classes`` is empty)."""
    groups = classes or ("",)
    for k, name in enumerate(groups):
        for i, image in enumerate(pixels(per_class, size, channels, seed=seed + k)):
            save_image(image, root / name / f"{i:04d}.png")
    return root


def make_npz(path: Path, n: int = 40, size: int = 12, layout: str = "NHWC", labels: bool = True,
             compressed: bool = False, seed: int = 0) -> Path:
    images = pixels(n, size, 3, seed)
    images = {"NHWC": images, "NCHW": images.transpose(0, 3, 1, 2), "NHW": images[..., 0]}[layout]
    arrays = {"images": images, **({"labels": np.arange(n) % 2} if labels else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path
