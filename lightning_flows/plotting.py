"""Pictures of samples: image grids for image data, scatter plots for 2D data."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def save_sample_figure(samples: Tensor, path: str | Path, title: str | None = None,
                       reference: Tensor | None = None, per_row: int | None = None) -> Path:
    """Write ``samples`` to ``path`` as PNG.

    ``samples``: images ``(N, C, H, W)`` with intensities in [0, 1] (a square-ish grid, or rows of ``per_row``
    images, e.g. one row per class), or points ``(N, 2)`` (a scatter plot, with optional ``reference`` points
    drawn beside them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = samples.detach().float().cpu()
    if samples.ndim == 4:
        import torchvision

        nrow = per_row or max(1, int(math.ceil(math.sqrt(samples.shape[0]))))
        # Small images are upscaled so that an 8x8 digit stays legible.
        scale = max(1, 64 // samples.shape[-1])
        if scale > 1:
            samples = torch.nn.functional.interpolate(samples, scale_factor=scale, mode="nearest")
        torchvision.utils.save_image(samples, path, nrow=nrow, padding=2, pad_value=1.0)
        return path
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"Can draw image batches (N, C, H, W) or 2D points (N, 2), got {tuple(samples.shape)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", reference), ("samples", samples)] if reference is not None else [("samples", samples)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], panels):
        pts = pts.detach().float().cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set_xlim(-5, 5)
        ax.set_ylim(-5, 5)
        ax.set_aspect("equal")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
