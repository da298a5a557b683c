"""Slow, obvious float64 NumPy oracles written straight from SPEC §1–§3 (tiny inputs only)."""

import math

import numpy as np


def alpha_bar(t, name="cosine"):
    t = np.asarray(t, np.float64)
    if name == "cosine":
        return np.cos(t / 1.008 * math.pi / 2) ** 2
    if name == "cosine_shifted":
        return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2 / np.cos(0.008 / 1.008 * math.pi / 2) ** 2
    if name == "linear":
        return 1.0 - (0.01 + 0.97 * t)
    if name == "exponential":
        return np.exp(-2.0 * t)
    raise ValueError(name)


def softmax_mean(logits, values):
    """Σ_c softmax(logits)_c values_c with float64 max subtraction. logits [M], values [M, ...]."""
    logits = np.asarray(logits, np.float64)
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return np.tensordot(w, np.asarray(values, np.float64), axes=1)


def ideal_x0(x, t, images, mask=None, schedule="cosine"):
    """x [B,H,W,C], images [N,H,W,C] → x̂_0 [B,H,W,C] by the literal SPEC formula."""
    ab = alpha_bar(t, schedule)
    a, b2 = math.sqrt(ab), 1.0 - ab
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    out = []
    for xq in np.asarray(x, np.float64):
        logits = np.array([-np.sum((xq - a * c) ** 2) / (2 * b2) for c in imgs])
        out.append(softmax_mean(logits, imgs))
    return np.stack(out)


def ideal_score(x, t, images, mask=None, schedule="cosine"):
    ab = alpha_bar(t, schedule)
    x0 = ideal_x0(x, t, images, mask, schedule)
    return -(np.asarray(x, np.float64) - math.sqrt(ab) * x0) / (1.0 - ab)
