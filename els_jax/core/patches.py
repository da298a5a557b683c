"""Patch (window) extraction, padding and window sums: the one place for them (docs/theory.md §2).

A k×k window centred on pixel (i, j) covers rows i−m … i+m and columns j−m … j+m, m = k//2.
Outside the image, a window either wraps around ("circular") or reads zeros ("zeros");
a window cut at the border (the local score machine) is the zero-padded window, since a
zero contributes nothing to the dot products and norms the machines use.
Window vectors are laid out (dy, dx, c), length k·k·C, identically for queries and candidates.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["BOUNDARIES", "pad", "extract_windows", "row_windows", "window_sum",
           "border_classes", "interior_slice"]

BOUNDARIES = ("circular", "zeros")


def _check_boundary(boundary: str):
    if boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; choose one of {BOUNDARIES}")


def pad(images, m: int, boundary: str):
    """[..., H, W, C] → [..., H+2m, W+2m, C], wrapping ("circular") or with zeros ("zeros")."""
    _check_boundary(boundary)
    widths = [(0, 0)] * (images.ndim - 3) + [(m, m), (m, m), (0, 0)]
    return jnp.pad(images, widths, mode="wrap" if boundary == "circular" else "constant")


def extract_windows(images, k: int, boundary: str):
    """Windows centred on every pixel: [..., H, W, C] → [..., H, W, k·k·C].

    One gather from the padded images with static index arrays (not a loop over pixels, nor
    k² slices: measured on XLA:CPU, the k² slices take 1–2 s to compile at k = 15 and are
    up to 3× slower to run; the gather compiles in 0.04 s).
    """
    m = k // 2
    h, w = images.shape[-3], images.shape[-2]
    d = np.arange(k)
    rows = np.arange(h)[:, None, None, None] + d[None, None, :, None]       # [H, 1, k, 1]
    cols = np.arange(w)[None, :, None, None] + d[None, None, None, :]       # [1, W, 1, k]
    out = pad(images, m, boundary)[..., rows, cols, :]                      # [..., H, W, k, k, C]
    return out.reshape(out.shape[:-3] + (k * k * images.shape[-1],))


def row_windows(images, k: int, boundary: str, cols):
    """Row windows: [..., H, W, C] → [..., H, len(cols), k·C], the k pixels of each row centred
    on each column of ``cols``, laid out (dx, c) as one row of a k×k window, padded per
    ``boundary`` (the rows of a window, for engines that sum window dot products row by row)."""
    m = k // 2
    h = images.shape[-3]
    padded = pad(images, m, boundary)[..., m:m + h, :, :]              # pad the columns only
    index = np.asarray(cols)[:, None] + np.arange(k)[None, :]            # [len(cols), k]
    rows = padded[..., index, :]                                         # one gather
    return rows.reshape(rows.shape[:-3] + (len(cols), k * images.shape[-1]))


def interior_slice(k: int, h: int, w: int):
    """Index of the pixels whose k×k window lies inside the image: rows/cols m … H−m−1."""
    m = k // 2
    return (slice(m, h - m), slice(m, w - m))


def window_sum(images, k: int, boundary: str):
    """Sum over the k×k window centred on every pixel: [..., H, W] → [..., H, W].

    Separable and independent of k in cost: a cumulative sum along each axis and one
    difference (the integral-image trick), on the padded array.
    """
    m = k // 2
    h, w = images.shape[-2], images.shape[-1]
    x = images[..., None]                                            # give pad() a channel axis
    x = pad(x, m, boundary)[..., 0]                                  # [..., H+2m, W+2m]
    zero_row = jnp.zeros(x.shape[:-2] + (1, x.shape[-1]), x.dtype)
    cs = jnp.concatenate([zero_row, jnp.cumsum(x, axis=-2)], axis=-2)
    x = cs[..., k:k + h, :] - cs[..., 0:h, :]                        # [..., H, W+2m]
    zero_col = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
    cs = jnp.concatenate([zero_col, jnp.cumsum(x, axis=-1)], axis=-1)
    return cs[..., k:k + w] - cs[..., 0:w]


def border_classes(n: int, k: int) -> np.ndarray:
    """Per-axis class of each coordinate for the zero-padded ELS machine (docs/theory.md §2 notes).

    A coordinate within m = k//2 of a border (i < m or i ≥ n−m) is its own class (its
    candidates must have centre coordinate exactly i); every other coordinate has the shared
    class −1 (candidates may have any centre coordinate in [m, n−m−1]). Returns int [n].
    """
    m = k // 2
    idx = np.arange(n)
    return np.where((idx < m) | (idx >= n - m), idx, -1).astype(np.int32)
