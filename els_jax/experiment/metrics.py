"""How well a machine predicts a network, image by image (docs/theory.md §4).

For one seed, with y = the network's final image and ŷ = the machine's, both flattened over
all pixels and channels:

    r   = Σ (y − ȳ)(ŷ − ŷ̄) / sqrt(Σ (y − ȳ)² · Σ (ŷ − ŷ̄)²)     Pearson correlation (the
                                                               authors' code reports r²)
    r²  = r · r
    R²  = 1 − Σ (y − ŷ)² / Σ (y − ȳ)²                           coefficient of determination,
                                                               network as the target

r² ignores gain and offset (a machine image that is a scaled copy of the network's has
r² = 1), R² does not (it can be negative). Both are reported side by side.

Everything here is NumPy in float64: these are a few hundred numbers per run, and exactness
beats speed. Degenerate images (constant target or prediction) give r = 0 (no linear
relation can be measured) and R² computed with SS_tot floored at a tiny value.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pearson_r", "r_squared", "coefficient_of_determination", "compare_images",
           "bootstrap_median", "summarize", "cosine_similarity"]

_TINY = 1e-12


def _flat(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images [S, ...]; got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


def _pair(target, pred):
    y, p = _flat(target), _flat(pred)
    if y.shape != p.shape:
        raise ValueError(f"target {np.shape(target)} and prediction {np.shape(pred)} differ")
    return y, p


def pearson_r(target, pred) -> np.ndarray:
    """Pearson r per image over all pixels: [S, ...] × [S, ...] → [S]."""
    y, p = _pair(target, pred)
    yc = y - y.mean(1, keepdims=True)
    pc = p - p.mean(1, keepdims=True)
    den = np.sqrt((yc * yc).sum(1) * (pc * pc).sum(1))
    return np.where(den > _TINY, (yc * pc).sum(1) / np.maximum(den, _TINY), 0.0)


def r_squared(target, pred) -> np.ndarray:
    """r² = pearson_r² per image: [S]."""
    return pearson_r(target, pred) ** 2


def coefficient_of_determination(target, pred) -> np.ndarray:
    """R² = 1 − SS_res / SS_tot per image, ``target`` (the network) as reference: [S]."""
    y, p = _pair(target, pred)
    ss_res = ((y - p) ** 2).sum(1)
    ss_tot = ((y - y.mean(1, keepdims=True)) ** 2).sum(1)
    return 1.0 - ss_res / np.maximum(ss_tot, _TINY)


def cosine_similarity(a, b) -> np.ndarray:
    """cos(a_s, b_s) per image over all pixels: [S, ...] × [S, ...] → [S]."""
    x, y = _pair(a, b)
    den = np.sqrt((x * x).sum(1) * (y * y).sum(1))
    return np.where(den > _TINY, (x * y).sum(1) / np.maximum(den, _TINY), 0.0)


def compare_images(target, pred) -> dict[str, np.ndarray]:
    """{"r", "r2", "R2"}: each [S], one value per seed."""
    r = pearson_r(target, pred)
    return {"r": r, "r2": r * r, "R2": coefficient_of_determination(target, pred)}


def bootstrap_median(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """(median, low, high): the median and its percentile-bootstrap interval at ``level``."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, size=(n_boot, v.size))], axis=1)
    lo, hi = np.quantile(meds, [(1 - level) / 2, (1 + level) / 2])
    return float(np.median(v)), float(lo), float(hi)


def summarize(per_seed: dict[str, dict[str, np.ndarray]], *, reference: str = "is",
              challenger: str = "els", seed: int = 0) -> dict:
    """Medians with bootstrap intervals, and how often ``challenger`` beats ``reference``.

    Args:
      per_seed: {machine: {"r": [S], "r2": [S], "R2": [S]}} (from ``compare_images``).
    Returns:
      {"median_r": {machine: m}, "median_r2": ..., "median_R2": ...,
       "ci_r": {machine: [lo, hi]}, "ci_r2": ..., "ci_R2": ...,
       "frac_els_beats_is": fraction of seeds with r²(challenger) > r²(reference)}
    """
    out: dict = {}
    for metric in ("r", "r2", "R2"):
        med, ci = {}, {}
        for name, values in per_seed.items():
            m, lo, hi = bootstrap_median(values[metric], seed=seed)
            med[name], ci[name] = m, [lo, hi]
        out[f"median_{metric}"], out[f"ci_{metric}"] = med, ci
    if challenger in per_seed and reference in per_seed:
        beats = per_seed[challenger]["r2"] > per_seed[reference]["r2"]
        out[f"frac_{challenger}_beats_{reference}"] = float(np.mean(beats))
    return out
