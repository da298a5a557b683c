"""The smoothed closed-form diffusion model (SCFDM, docs/theory.md §7.6; Scarvelis, Borde &
Solomon, *Closed-form diffusion models*, 2023).

Closed-form denoiser with temperature τ,

    x̂_0(x) = Σ_i softmax_i(−‖x − a·x_i‖² / (2b²τ)) x_i        (the ideal machine at τ = 1),

averaged over M perturbed inputs:

    x̂_0^SCFDM(x) = (1/M) Σ_m x̂_0(x + s·ε_m),      ε_m ~ N(0, I).

The score is the usual conversion of this x̂_0, s = −(x − a·x̂_0)/b² (docs/theory.md §1.4).

- **Exact over all N by default**: the training set is streamed in chunks through the shared
  online softmax (els_jax.softmax), as in the ideal machine, so memory is O(chunk_size·D)
  whatever N is (D = H·W·C).
- **Optional top-k**: the softmax runs only over the k candidates nearest to the (perturbed)
  query by ‖x − a·x_i‖, found by a running top-k over the same chunks (exact; on ties the
  earlier image wins). This is analytic-diffusion-studio's setting (its CIFAR-10 config:
  τ = 1, k = 200, M = 10, s = 0.1), there found by a FAISS search on x/a, the same ranking.
- **The perturbations are data**: ε [M, H, W, C] is drawn from an explicit PRNG key
  (``draw_perturbations``) and shared by every query of a call, so a query's result does not
  depend on the rest of its batch (vmap over queries equals the batched call) and the machine
  is deterministic. (analytic-diffusion-studio draws fresh noise per query and per call.)
  With s = 0 the M perturbations are identical and one is computed (M counts as 1).
- **Class-conditional** through a boolean mask [N] (log weight −inf for the others).
- Differentiable in x and t (jax.grad, jax.jvp): the top-k selection is piecewise constant,
  so the derivative flows through the selected logits only.

The M perturbed copies are folded into the batch of queries: B queries become B·M, each with
the a, b² of its own query, and the M answers of a query are averaged at the end.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from els_jax.core import conversions, softmax
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights
from els_jax.machines import ideal
from els_jax.core.data import unit_images
from els_jax.machines.ideal import prepare

__all__ = ["scfdm_x0", "scfdm_score", "scfdm_x0_at", "draw_perturbations", "perturbations",
           "check_params", "ScfdmParams", "prepare", "DEFAULTS"]

# analytic-diffusion-studio's CIFAR-10 setting (configs/scfdm/cifar10.yaml), except top_k:
# exact over all N unless asked.
DEFAULTS = dict(temperature=1.0, num_perturb=10, noise_scale=0.1, top_k=None)


class ScfdmParams(NamedTuple):
    """Checked SCFDM parameters: τ > 0, M ≥ 1, s ≥ 0, k in [1, N] or None (all N)."""

    temperature: float
    num_perturb: int
    noise_scale: float
    top_k: int | None


def check_params(*, temperature, num_perturb, noise_scale, top_k, key, n: int) -> ScfdmParams:
    """Clear ValueErrors for bad SCFDM parameters; ``n`` is the number of candidates (after a
    class mask). None means the default (``DEFAULTS``). ``key`` may be None only when
    noise_scale = 0 (nothing is drawn)."""
    temperature = DEFAULTS["temperature"] if temperature is None else temperature
    num_perturb = DEFAULTS["num_perturb"] if num_perturb is None else num_perturb
    noise_scale = DEFAULTS["noise_scale"] if noise_scale is None else noise_scale
    for name, v in (("temperature", temperature), ("noise_scale", noise_scale)):
        if isinstance(v, bool) or not isinstance(v, (numbers.Real, np.ndarray, jax.Array)) \
                or np.ndim(v) != 0 or isinstance(v, jax.core.Tracer):
            raise ValueError(f"{name} must be a real number (a concrete scalar); got {v!r}")
    temperature, noise_scale = float(temperature), float(noise_scale)
    if not (temperature > 0 and math.isfinite(temperature)):       # also rejects NaN
        raise ValueError(f"temperature must be a finite number > 0 (logits are divided by "
                         f"2b²·temperature); got {temperature}")
    if not (noise_scale >= 0 and math.isfinite(noise_scale)):
        raise ValueError(f"noise_scale must be a finite number ≥ 0 (the perturbations' "
                         f"standard deviation s); got {noise_scale}")
    if not isinstance(num_perturb, (int, np.integer)) or isinstance(num_perturb, bool) \
            or num_perturb < 1:
        raise ValueError(f"num_perturb must be an int ≥ 1 (the number M of perturbed "
                         f"copies); got {num_perturb!r}")
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool):
            raise ValueError(f"top_k must be an int or None (all images); got {top_k!r}")
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k must lie in [1, {n}] (the number of candidate images, "
                             f"after a class mask) or be None; got {top_k}")
        top_k = int(top_k)
    if noise_scale > 0 and key is None:
        raise ValueError("scfdm with noise_scale > 0 needs key=jax.random.key(...) (the "
                         "perturbations are drawn from it, once); key=None is allowed only "
                         "with noise_scale=0")
    if key is not None and isinstance(key, (numbers.Number, np.number)):
        raise ValueError(f"key must be a JAX PRNG key (jax.random.key(seed) or "
                         f"jax.random.PRNGKey(seed)), not {key!r}")
    return ScfdmParams(temperature, int(num_perturb), noise_scale, top_k)


def draw_perturbations(key, num_perturb: int, shape) -> Float[Array, "m h w c"]:
    """ε [M, H, W, C] ~ N(0, I), float32, from ``key``: shared by every query of a call."""
    if key is None or isinstance(key, (numbers.Number, np.number)):
        raise ValueError(f"key must be a JAX PRNG key (jax.random.key(seed) or "
                         f"jax.random.PRNGKey(seed)); got {key!r}")
    return jax.random.normal(key, (int(num_perturb),) + tuple(int(d) for d in shape),
                             jnp.float32)


def perturbations(key, params: ScfdmParams, shape):
    """The ε a call uses: ``draw_perturbations`` or, for s = 0 (every copy is x itself), one
    zero image [1, H, W, C] (M counts as 1: the M identical copies are computed once)."""
    if params.noise_scale == 0:
        return jnp.zeros((1,) + tuple(int(d) for d in shape), jnp.float32)
    return draw_perturbations(key, params.num_perturb, shape)


def _all_x0(q, a, scale, flat, half_sq, log_w, chunk_size):
    """Softmax over all N: the ideal machine's stream with logits divided by τ. q [Q, D]."""
    n = flat.shape[0]
    starts, first_new = softmax.chunk_starts(n, chunk_size)

    def body(state, chunk):
        c, score, lw = ideal.chunk_scores(q, a, flat, half_sq, log_w, *chunk, chunk_size)
        return softmax.update(state, score / scale + lw[None], c), None

    state, _ = jax.lax.scan(body, softmax.init((q.shape[0],), flat.shape[1]),
                            (starts, first_new))
    return softmax.finalize(state)


def _top_k_select(q, a, flat, half_sq, log_w, top_k, chunk_size):
    """The k candidates of largest a q·c − a²‖c − μ‖²/2 (= −‖x − a·c‖²/2 + a per-query
    constant: the k nearest by ‖x − a·c‖), by a running top-k over the chunks.

    Returns (vals [Q, k], idx [Q, k] int32), largest first. Exact: each chunk's candidates
    compete with the k kept so far. The kept ones come first in the array ``lax.top_k`` sees
    and it returns the lower position first on equal values, so on ties the earlier image
    wins. Absent candidates (class mask, rows the shifted last chunk has seen) are −inf."""
    nq, n = q.shape[0], flat.shape[0]
    starts, first_new = softmax.chunk_starts(n, chunk_size)
    rows = jnp.arange(chunk_size, dtype=jnp.int32)

    def body(best, chunk):
        vals, idx = best
        start, _ = chunk
        _, score, lw = ideal.chunk_scores(q, a, flat, half_sq, log_w, *chunk, chunk_size)
        both = jnp.concatenate([vals, score + lw[None]], axis=1)              # [Q, k + M]
        both_idx = jnp.concatenate(
            [idx, jnp.broadcast_to((start + rows)[None], (nq, chunk_size))], axis=1)
        vals, j = jax.lax.top_k(both, top_k)
        return (vals, jnp.take_along_axis(both_idx, j, axis=1)), None

    init = (jnp.full((nq, top_k), -jnp.inf, jnp.float32), jnp.zeros((nq, top_k), jnp.int32))
    (vals, idx), _ = jax.lax.scan(body, init, (starts, first_new))
    return vals, idx


def _top_k_x0(q, a, scale, flat, half_sq, log_w, top_k, chunk_size):
    """Softmax over the k nearest only. Their logits are the selected scores themselves (so
    the derivative flows through them; the choice of indices has none). Their images are
    gathered per query, g at a time, through the online softmax; g = chunk_size // Q (at
    least 1) keeps the gathered [Q, g, D] about the size of one chunk of candidates."""
    vals, idx = _top_k_select(q, a, flat, half_sq, log_w, top_k, chunk_size)
    logits = vals / scale                                                  # [Q, k]
    nq = q.shape[0]
    g = int(max(1, min(top_k, chunk_size // nq)))
    starts, first_new = softmax.chunk_starts(top_k, g)
    cols = jnp.arange(g, dtype=jnp.int32)

    def body(state, chunk):
        start, first = chunk
        lg = jax.lax.dynamic_slice_in_dim(logits, start, g, axis=1)
        ix = jax.lax.dynamic_slice_in_dim(idx, start, g, axis=1)
        lg = jnp.where((cols >= first)[None], lg, -jnp.inf)               # seen before
        values = unit_images(jnp.take(flat, ix, axis=0)).astype(jnp.float32)  # [Q, g, D]
        return softmax.update(state, lg, values), None

    state, _ = jax.lax.scan(body, softmax.init((nq,), flat.shape[1]), (starts, first_new))
    return softmax.finalize(state)


@functools.partial(jax.jit, static_argnames=("top_k", "chunk_size"))
def scfdm_x0_at(x, a, b2, eps, flat, mu, half_sq, log_w, *, temperature, noise_scale, top_k,
                chunk_size):
    """SCFDM x̂_0 [B, H, W, C] from the coefficients a, b² [B] (never a time).

    Args:
      x: queries [B, H, W, C]; a, b2: [B] (``schedules.query_coefficients``).
      eps: the drawn perturbations ε [M, H, W, C] (``perturbations``); query b's copies are
        x_b + s·ε_m.
      flat, mu, half_sq: ``prepare``'s [N, D] (or the images [N, H, W, C]; uint8 or float),
        [D], [N]; log_w: [N] 0 or −inf (class mask).
      temperature: τ > 0 (scalar, may be traced); noise_scale: s ≥ 0 (scalar, may be traced).
      top_k: None (softmax over all N) or k in [1, N] (static).
      chunk_size: training images per streamed chunk (static; memory, not the result).
    Returns:
      (1/M) Σ_m x̂_0(x + s·ε_m), [B, H, W, C].
    """
    bsz, m = x.shape[0], eps.shape[0]
    flat = ideal.flat_images(flat)            # [N, H, W, C] images are flattened here, free
    d = flat.shape[1]
    # Fold the M copies into the batch: row b·M + m is x_b + s·ε_m, with x_b's a and b².
    xp = x.reshape(bsz, 1, d) + noise_scale * eps.reshape(1, m, d)          # [B, M, D]
    a = jnp.repeat(a, m)[:, None]                                           # [B·M, 1]
    # The logit −‖q − a(c − μ)‖²/(2b²τ) is, up to a term the same for every candidate,
    # (a q·c − a²‖c − μ‖²/2)/(b²τ) (ideal.chunk_scores); centring on μ keeps q·c accurate.
    scale = jnp.repeat(b2, m)[:, None] * temperature                        # [B·M, 1]
    q = xp.reshape(bsz * m, d) - a * mu[None]
    if top_k is None:
        x0 = _all_x0(q, a, scale, flat, half_sq, log_w, chunk_size)
    else:
        x0 = _top_k_x0(q, a, scale, flat, half_sq, log_w, top_k, chunk_size)
    return jnp.mean(x0.reshape(bsz, m, d), axis=1).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("top_k", "chunk_size"))
def _scfdm_x0(x, a, b2, eps, images, log_w, *, temperature, noise_scale, top_k, chunk_size):
    flat, mu, half_sq = prepare(images)
    return scfdm_x0_at(x, a, b2, eps, flat, mu, half_sq, log_w, temperature=temperature,
                       noise_scale=noise_scale, top_k=top_k, chunk_size=chunk_size)


def _checked(x, images, key, mask, chunk_size, **kw):
    """Checked inputs: x float32, log weights [N], ε, params, the chunk size in [1, N]."""
    check_query_and_images(x, images)
    n = images.shape[0]
    log_w = mask_log_weights(mask, n)
    if mask is not None and not isinstance(mask, jax.core.Tracer):
        n = int(np.sum(np.asarray(mask, bool)))        # top_k counts selected images only
    params = check_params(key=key, n=n, **kw)
    x = jnp.asarray(x, jnp.float32)
    eps = perturbations(key, params, x.shape[1:])
    return x, log_w, eps, params, int(max(1, min(chunk_size, images.shape[0])))


def _x0(x, coeffs, images, log_w, eps, params, chunk):
    return _scfdm_x0(x, coeffs.a, coeffs.b2, eps, images, log_w,
                     temperature=jnp.float32(params.temperature),
                     noise_scale=jnp.float32(params.noise_scale), top_k=params.top_k,
                     chunk_size=chunk)


def scfdm_x0(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, key=None,
             temperature: float = 1.0, num_perturb: int = 10, noise_scale: float = 0.1,
             top_k: int | None = None, mask=None, schedule=schedules_lib.Cosine(),
             chunk_size: int = 256) -> Float[Array, "b h w c"]:
    """Denoised mean of the smoothed closed-form diffusion model (module docstring):

        x̂_0(x) = (1/M) Σ_m Σ_i softmax_i(−‖x + s·ε_m − a·x_i‖² / (2b²τ)) x_i

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query, [B].
      images: training set [N, H, W, C] in [-1, 1].
      key: JAX PRNG key the ε_m [M, H, W, C] are drawn from (``draw_perturbations``), shared
        by all queries; may be None only when noise_scale = 0.
      temperature: τ > 0 (τ = 1, s = 0 is the ideal machine).
      num_perturb: M ≥ 1 perturbed copies per query (one is computed when s = 0).
      noise_scale: s ≥ 0, the perturbations' standard deviation.
      top_k: None (softmax over all images) or k: only the k nearest to each perturbed copy
        by ‖x + s·ε_m − a·x_i‖ (ties: the earlier image).
      mask: optional boolean [N]; only images with True are candidates (class-conditional).
      schedule: a Schedule or its name.
      chunk_size: training images per streamed chunk (memory knob, not a result knob).
    Returns:
      x̂_0 [B, H, W, C]. Works under jax.jit / jax.vmap; differentiable w.r.t. x and t.

        >>> x0 = scfdm_x0(x, 0.5, images, key=jax.random.key(0), top_k=200)
    """
    x, log_w, eps, params, chunk = _checked(
        x, images, key, mask, chunk_size, temperature=temperature, num_perturb=num_perturb,
        noise_scale=noise_scale, top_k=top_k)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return _x0(x, coeffs, images, log_w, eps, params, chunk)


def scfdm_score(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, key=None,
                temperature: float = 1.0, num_perturb: int = 10, noise_scale: float = 0.1,
                top_k: int | None = None, mask=None, schedule=schedules_lib.Cosine(),
                chunk_size: int = 256) -> Float[Array, "b h w c"]:
    """Score of the SCFDM machine, s = −(x − a·x̂_0)/b² with x̂_0 = ``scfdm_x0`` (same
    arguments), [B, H, W, C].

        >>> s = scfdm_score(x, 0.5, images, key=jax.random.key(0), mask=labels == 3)
    """
    x, log_w, eps, params, chunk = _checked(
        x, images, key, mask, chunk_size, temperature=temperature, num_perturb=num_perturb,
        noise_scale=noise_scale, top_k=top_k)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(_x0(x, coeffs, images, log_w, eps, params, chunk), x,
                                      coeffs)
