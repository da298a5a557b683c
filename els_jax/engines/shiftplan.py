"""Which (query pixel, candidate centre) pairs the shift-map engine visits (docs/theory.md §2),
as shifts d = j − i: the plan shared by its jnp form (``shiftmap.py``) and its Pallas kernel
(``shiftmap_pallas.py``). Pure numpy, static: computed when a shape is traced."""

from __future__ import annotations

import numpy as np

__all__ = ["axis_plan", "geometry"]


def axis_plan(n: int, k: int, mode: str):
    """The pairs along one axis of length n: (shifts [S] int, valid [S, n] bool), valid[s, i]
    iff query coordinate i pairs with candidate centre i + shifts[s] (mod n for "circular" and
    "wrap", whose shifts are 0 … n−1). Straight from docs/theory.md §2 (shiftmap.py's module docstring lists
    the rules)."""
    m = k // 2
    i = np.arange(n)
    if mode == "local":
        return np.zeros(1, np.int64), np.ones((1, n), bool)
    if mode in ("circular", "wrap"):
        d = np.arange(n)
        j = (i[None, :] + d[:, None]) % n
        valid = np.ones((n, n), bool) if mode == "wrap" else (j >= m) & (j < n - m)
        return d, valid
    if mode != "zeros":
        raise ValueError(f"unknown mode {mode!r}")
    inner = n - 2 * m
    d = np.arange(-(inner - 1), inner)
    j = i[None, :] + d[:, None]
    interior = (i >= m) & (i < n - m)
    valid = ((d[:, None] == 0) & ~interior[None, :]) | (
        interior[None, :] & (j >= m) & (j < n - m))
    return d, valid


def geometry(h: int, w: int, k: int, mode: str):
    """Shifts and pads of the jnp and Pallas forms: (dy, dx, oy, ox, vy, vx, pads), per
    flattened shift s (dy[s] = sy[iy[s]], dx[s] = sx[ix[s]]) the offsets oy, ox of y_d in
    the images padded by pads = (lo_y, hi_y, lo_x, hi_x) (beyond m) and the per-axis valid
    masks vy [S, H], vx [S, W] of the query rows and columns."""
    sy, vy = axis_plan(h, k, mode)
    sx, vx = axis_plan(w, k, mode)
    iy, ix = np.divmod(np.arange(len(sy) * len(sx)), len(sx))
    lo_y, hi_y = max(0, -int(sy.min())), max(0, int(sy.max()))
    lo_x, hi_x = max(0, -int(sx.min())), max(0, int(sx.max()))
    return (sy[iy], sx[ix], sy[iy] + lo_y, sx[ix] + lo_x, vy[iy], vx[ix],
            (lo_y, hi_y, lo_x, hi_x))
