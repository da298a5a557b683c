"""Slow, obvious float64 NumPy oracles written straight from docs/theory.md §1–§3 (tiny inputs only)."""

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
    """x [B,H,W,C], images [N,H,W,C] → x̂_0 [B,H,W,C] by the literal formula of docs/theory.md §2."""
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


def _coeffs(t, schedule="cosine"):
    ab = float(alpha_bar(t, schedule))
    return math.sqrt(ab), 1.0 - ab


def window(img, i, j, k, mode):
    """k×k window of img [H, W, C] centred on (i, j): "circular" wraps, "zeros" pads with 0.
    Returns (values [k, k, C], inside [k, k] bool)."""
    h, w, c = img.shape
    m = k // 2
    out = np.zeros((k, k, c))
    inside = np.zeros((k, k), bool)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            y, x = i + dy, j + dx
            if mode == "circular":
                out[dy + m, dx + m] = img[y % h, x % w]
                inside[dy + m, dx + m] = True
            elif 0 <= y < h and 0 <= x < w:
                out[dy + m, dx + m] = img[y, x]
                inside[dy + m, dx + m] = True
    return out, inside


def local_x0(x, t, images, k, mask=None, schedule="cosine"):
    """LS: window cut at the border, candidates = same-location windows of every image."""
    a, b2 = _coeffs(t, schedule)
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for bi in range(x.shape[0]):
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                q, inside = window(x[bi], i, j, k, "zeros")
                logits, vals = [], []
                for c in imgs:
                    cw, _ = window(c, i, j, k, "zeros")
                    logits.append(-np.sum(((q - a * cw) ** 2)[inside]) / (2 * b2))
                    vals.append(c[i, j])
                out[bi, i, j] = softmax_mean(logits, np.array(vals))
    return out


def equivariant_x0(x, t, images, mask=None, schedule="cosine"):
    """ES: the ideal machine over every circular translate of every training image."""
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    h, w = imgs.shape[1:3]
    translates = np.stack([np.roll(c, (sy, sx), axis=(0, 1)) for c in imgs
                           for sy in range(h) for sx in range(w)])
    return ideal_x0(x, t, translates, schedule=schedule)


def els_candidates(xb, i, j, t, images, k, boundary="circular", wrap_patches=False,
                   schedule="cosine", cache=None):
    """ELS candidates of pixel (i, j) of one query xb [H,W,C], literally from docs/theory.md §2.
    Returns (logits [M], values [M, C], image index [M], centre row [M], centre col [M]).
    cache: an optional dict (one per images, k, boundary) keeping each list of candidate
    windows, which does not depend on the query, from pixel to pixel."""
    a, b2 = _coeffs(t, schedule)
    h, w = xb.shape[:2]
    m = k // 2

    def centres(i, n):  # allowed candidate centre coordinates along one axis
        if boundary == "circular":
            return range(n) if wrap_patches else range(m, n - m)
        if i < m or i >= n - m:
            return [i]
        return range(m, n - m)

    q, _ = window(np.asarray(xb, np.float64), i, j, k, boundary)
    key = (tuple(centres(i, h)), tuple(centres(j, w)))
    if cache is None or key not in cache:
        wins, vals, idx, us, vs = [], [], [], [], []
        for n, c in enumerate(np.asarray(images, np.float64)):
            for u in key[0]:
                for v in key[1]:
                    cw, _ = window(c, u, v, k, boundary)
                    for lst, val in zip((wins, vals, idx, us, vs), (cw, c[u, v], n, u, v)):
                        lst.append(val)
        found = tuple(np.array(o) for o in (wins, vals, idx, us, vs))
        if cache is None:
            cache = {}
        cache[key] = found
    wins, vals, idx, us, vs = cache[key]
    logits = -np.sum((q[None] - a * wins) ** 2, axis=tuple(range(1, wins.ndim))) / (2 * b2)
    return logits, vals, idx, us, vs


def els_x0(x, t, images, k, boundary="circular", wrap_patches=False, mask=None,
           schedule="cosine"):
    """ELS, literally from the docs/theory.md §2 table and notes."""
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    x = np.asarray(x, np.float64)
    _, h, w, _ = x.shape
    if boundary == "zeros" and k >= min(h, w):
        return local_x0(x, t, images, k, mask, schedule)
    out = np.zeros_like(x)
    cache = {}
    for bi in range(x.shape[0]):
        for i in range(h):
            for j in range(w):
                logits, vals, *_ = els_candidates(x[bi], i, j, t, imgs, k, boundary,
                                                  wrap_patches, schedule, cache)
                out[bi, i, j] = softmax_mean(logits, vals)
    return out


def els_soft_x0(x, t, images, sigma, k_max, boundary="circular", wrap_patches=False,
                mask=None, schedule="cosine"):
    """els_soft (docs/theory.md §7), literally: the ELS candidates of window size k_max (docs/theory.md §2 table
    and notes; zero padding with k_max ≥ min(H, W): the same-location windows of LS), logits
    −Σ_δ g_σ(δ)(q_δ − a·c_δ)²/(2b²) with g_σ(δ) = exp(−‖δ‖²/(2σ²)) (σ = inf: g ≡ 1)."""
    a, b2 = _coeffs(t, schedule)
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    x = np.asarray(x, np.float64)
    _, h, w, _ = x.shape
    m = k_max // 2
    d = np.arange(-m, m + 1)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2.0 * float(sigma) ** 2))[..., None]
    local = boundary == "zeros" and k_max >= min(h, w)

    def centres(i, n):
        if local:
            return [i]
        if boundary == "circular":
            return range(n) if wrap_patches else range(m, n - m)
        if i < m or i >= n - m:
            return [i]
        return range(m, n - m)

    out = np.zeros_like(x)
    for bi in range(x.shape[0]):
        for i in range(h):
            for j in range(w):
                q, _ = window(x[bi], i, j, k_max, boundary)
                logits, vals = [], []
                for c in imgs:
                    for u in centres(i, h):
                        for v in centres(j, w):
                            cw, _ = window(c, u, v, k_max, boundary)
                            logits.append(-np.sum(g * (q - a * cw) ** 2) / (2 * b2))
                            vals.append(c[u, v])
                out[bi, i, j] = softmax_mean(logits, np.array(vals))
    return out


# --- docs/theory.md §7 families: gaussian (Wiener), nearest, pca_locality ------------------------------

def _flat_selected(images, mask=None):
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    return imgs.reshape(imgs.shape[0], -1)


def gaussian_moments(images, mask=None):
    """μ [D] and the maximum-likelihood (1/N) covariance Σ [D, D], pixels in (H, W, C) order."""
    flat = _flat_selected(images, mask)
    mu = flat.mean(axis=0)
    centred = flat - mu
    return mu, centred.T @ centred / flat.shape[0]


def gaussian_x0(x, t, images, rank=None, mask=None, schedule="cosine"):
    """Wiener: x̂_0 = μ + aΣ(a²Σ + b²I)⁻¹(x − aμ) by a linear solve (no eigendecomposition);
    with a rank, Σ is replaced by its top-r eigen-part."""
    a, b2 = _coeffs(t, schedule)
    mu, cov = gaussian_moments(images, mask)
    if rank is not None:
        lam, u = np.linalg.eigh(cov)
        top = np.argsort(lam)[::-1][:rank]
        cov = (u[:, top] * lam[top]) @ u[:, top].T
    d = mu.shape[0]
    x = np.asarray(x, np.float64)
    q = x.reshape(x.shape[0], -1) - a * mu
    out = mu + a * (cov @ np.linalg.solve(a * a * cov + b2 * np.eye(d), q.T)).T
    return out.reshape(x.shape)


def nearest_x0(x, t, images, mask=None, schedule="cosine"):
    """The training image minimising ‖x − a·x_i‖² (literally, one distance at a time)."""
    a, _ = _coeffs(t, schedule)
    imgs = np.asarray(images, np.float64)
    if mask is not None:
        imgs = imgs[np.asarray(mask)]
    out = []
    for xq in np.asarray(x, np.float64):
        d2 = [np.sum((xq - a * c) ** 2) for c in imgs]
        out.append(imgs[int(np.argmin(d2))])
    return np.stack(out)


def pca_locality_mask(t, images, tau, mask=None, schedule="cosine"):
    """(M̃, M) [D, D] of docs/theory.md §7: W_t = a²Σ(a²Σ + b²I)⁻¹ by a linear solve, M̃[n,m] =
    W[n,m]/W[n,n] (a W[n,n] with |W[n,n]| < 1e-3·max|diag W| counts as 1, in the divisor and
    as M̃[n,n]), M = |M̃| ≥ τ·max|M̃|."""
    a, b2 = _coeffs(t, schedule)
    _, cov = gaussian_moments(images, mask)
    d = cov.shape[0]
    # W = a²Σ A⁻¹ with A = a²Σ + b²I symmetric: W = (A⁻¹ a²Σ)ᵀ.
    w = np.linalg.solve(a * a * cov + b2 * np.eye(d), a * a * cov).T
    diag = np.diag(w).copy()
    floored = np.abs(diag) < 1e-3 * np.abs(diag).max()
    diag[floored] = 1.0
    m_tilde = w / diag[:, None]
    m_tilde[np.diag_indices(d)] = 1.0           # the floored entry counts as 1 where it stands
    return m_tilde, np.abs(m_tilde) >= tau * np.abs(m_tilde).max()


def pca_locality_x0(x, t, images, tau, mask=None, schedule="cosine"):
    """x̂_0[m] = Σ_i softmax_i(−Σ_n M[n,m](x_n − a x_{i,n})²/(2b²)) x_{i,m}, pixel by pixel,
    one softmax over all selected images."""
    a, b2 = _coeffs(t, schedule)
    _, m = pca_locality_mask(t, images, tau, mask, schedule)
    flat = _flat_selected(images, mask)
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], flat.shape[1]))
    for bi, xq in enumerate(x.reshape(x.shape[0], -1)):
        for px in range(flat.shape[1]):
            logits = [-np.sum(m[:, px] * (xq - a * c) ** 2) / (2 * b2) for c in flat]
            out[bi, px] = softmax_mean(logits, flat[:, px])
    return out.reshape(x.shape)


def pca_locality_jacobian(xq, t, images, tau, mask=None, schedule="cosine"):
    """∂x̂_0[m]/∂x[n] [D, D] for one query xq [H, W, C], from the softmax's covariance:
    ∂x̂_0[m]/∂x_n = (a·M[n,m]/b²)·Cov_{w[m]}(x_{·,m}, x_{·,n})."""
    a, b2 = _coeffs(t, schedule)
    _, m = pca_locality_mask(t, images, tau, mask, schedule)
    flat = _flat_selected(images, mask)
    xq = np.asarray(xq, np.float64).reshape(-1)
    d = flat.shape[1]
    jac = np.zeros((d, d))
    for px in range(d):
        logits = np.array([-np.sum(m[:, px] * (xq - a * c) ** 2) / (2 * b2) for c in flat])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        mean = w @ flat
        cov_m = (w * (flat[:, px] - mean[px])) @ (flat - mean)           # [D]: Cov(x_m, x_n)
        jac[px] = a * m[:, px] * cov_m / b2
    return jac


# --- docs/theory.md §7.6: scfdm (smoothed closed-form diffusion model) ----------------------------

def scfdm_x0(x, t, images, eps, temperature, noise_scale, top_k=None, mask=None,
             schedule="cosine"):
    """(1/M) Σ_m Σ_i softmax_i(−‖x + s·ε_m − a·x_i‖²/(2b²τ)) x_i, literally: one query and one
    perturbation at a time; with top_k, the softmax runs over the k smallest ‖x + s·ε_m − a·x_i‖
    (a stable sort: ties keep the earlier image). eps [M, H, W, C]."""
    a, b2 = _coeffs(t, schedule)
    flat = _flat_selected(images, mask)
    eps = np.asarray(eps, np.float64).reshape(np.shape(eps)[0], -1)
    x = np.asarray(x, np.float64)
    out = []
    for xq in x.reshape(x.shape[0], -1):
        per_copy = []
        for e in eps:
            xp = xq + noise_scale * e
            d2 = np.array([np.sum((xp - a * c) ** 2) for c in flat])
            keep = np.argsort(d2, kind="stable")[:top_k]           # (all of them for None)
            per_copy.append(softmax_mean(-d2[keep] / (2 * b2 * temperature), flat[keep]))
        out.append(np.mean(per_copy, axis=0))
    return np.stack(out).reshape(x.shape)
