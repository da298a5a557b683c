"""Figures: image grids (PNG) for samples. matplotlib with the non-interactive Agg backend."""

from __future__ import annotations

import numpy as np

__all__ = ["image_grid", "save_image_grid"]


def image_grid(images, ncols: int | None = None, pad: int = 1):
    """[B, H, W, C] in [−1, 1] → one [rows·(H+pad), cols·(W+pad), C] array in [0, 1]."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    b, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(b)))
    nrows = int(np.ceil(b / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for idx in range(b):
        r, col = divmod(idx, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[idx]
    return grid


def save_image_grid(path, images, ncols: int | None = None, title: str | None = None,
                    scale: float = 0.3):
    """Writes the grid of ``images`` [B, H, W, C] to a PNG file at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = image_grid(images, ncols)
    h, w = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(max(2.0, w * scale / 8), max(2.0, h * scale / 8)))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
