"""Figures (PNG): image grids of samples (``save_image_grid``, Pillow), and the four figures of
a run's report (``report_figures``, matplotlib with the non-interactive Agg backend).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["image_grid", "save_image_grid", "report_figures"]


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
                    zoom: int | None = None):
    """Writes the grid of ``images`` [B, H, W, C] in [−1, 1] to a PNG file at ``path``: 8-bit
    grey (C = 1) or RGB (C = 3), each pixel of ``image_grid`` repeated ``zoom`` × ``zoom``
    (default: the grid's short side at least 256 pixels, at most ×8), ``title`` stored as the
    PNG's Title text. Written by Pillow (matplotlib's own image library) directly: importing
    pyplot for one image took 0.6 s of a 7 s ``els-jax sample``."""
    from PIL import Image, PngImagePlugin

    grid = image_grid(images, ncols)
    if grid.shape[-1] not in (1, 3):
        raise ValueError(f"images need 1 or 3 channels to be written as PNG; got {grid.shape[-1]}")
    if zoom is None:
        zoom = int(min(8, max(1, -(-256 // min(grid.shape[:2])))))
    pixels = np.round(grid * 255.0).astype(np.uint8)
    pixels = np.repeat(np.repeat(pixels, zoom, axis=0), zoom, axis=1)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    info = PngImagePlugin.PngInfo()
    if title:
        info.add_text("Title", title)
    image.save(path, format="PNG", pnginfo=info)


def report_figures(out, net, results, per_seed, scales, report) -> dict:
    """The report's figures in ``out``/figures/; returns {figure: path relative to ``out``}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fdir = os.path.join(out, "figures")
    os.makedirs(fdir, exist_ok=True)
    paths = {}
    names = list(report["families"])
    # 1. Image grid: one row per seed, columns network | every family.
    rows = min(12, len(net["x0"]))
    ncols = 1 + len(names)
    cols = [net["x0"][:rows]] + [results[n]["x0"][:rows] for n in names]
    stack = np.stack(cols, axis=1).reshape((-1,) + net["x0"].shape[1:])
    grid = image_grid(stack, ncols=ncols)
    fig, ax = plt.subplots(figsize=(ncols * 1.0, rows * 1.0 + 0.6))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([(i + 0.5) * grid.shape[1] / ncols for i in range(ncols)])
    ax.set_xticklabels(["network"] + [n.upper() for n in names], rotation=45, ha="right")
    ax.set_yticks([])
    fig.savefig(os.path.join(fdir, "grid.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["grid"] = "figures/grid.png"
    # 2. r² of ELS vs IS per seed (the paper's scatter).
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(per_seed["is"]["r2"], per_seed["els"]["r2"], s=12)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("r² (IS vs network)")
    ax.set_ylabel("r² (ELS vs network)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.savefig(os.path.join(fdir, "scatter_els_vs_is.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["scatter"] = "figures/scatter_els_vs_is.png"
    # 3. Calibrated patch size vs t (step order: first step = t near 1).
    times = np.asarray(scales["times"])[:-1]
    fig, ax = plt.subplots(figsize=(5, 3))
    for name in ("els", "ls"):
        if name not in scales:
            continue
        ax.step(times, scales[name]["per_step"], where="mid", label=name.upper())
    ax.set_xlabel("t")
    ax.set_ylabel("patch size k")
    ax.legend()
    fig.savefig(os.path.join(fdir, "scales.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["scales"] = "figures/scales.png"
    # 4. Per-step agreement with the network: along the two trajectories (x̂_0 of each at its
    #    own x_t) and single-step (the network at the machine's x_t), R² and MSE.
    agree, single = report["agreement_x0_r2"], report["single_step"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    panels = [(axes[0], agree, "median r² of x̂₀ (own trajectories)"),
              (axes[1], single["R2"], "single-step median R² of x̂₀"),
              (axes[2], single["mse"], "single-step median MSE of x̂₀")]
    for ax, values, label in panels:
        for name in names:
            ax.plot(agree["times"], values[name], marker="o", ms=3, label=name.upper())
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.invert_xaxis()
    axes[1].set_ylim(max(-1.0, axes[1].get_ylim()[0]), 1.02)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(fdir, "agreement.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths["agreement"] = "figures/agreement.png"
    return paths
