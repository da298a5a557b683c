"""The "els_soft" machine: ELS with a learned soft locality (docs/theory.md §7).

The ELS machine (``els.py``) compares the k×k window of x around each pixel with every
candidate window. Here the hard window is replaced by a Gaussian window of width σ on a
support of k_max × k_max pixels (k_max odd, m = k_max//2):

    g_σ(δ) = exp(−‖δ‖² / (2σ²)),        δ = (dy, dx) ∈ {−m … m}²,

    w_{i,c} = softmax_c( −Σ_δ g_σ(δ)·(q_{i,δ} − a·c_δ)² / (2b²) ),      x̂_0,i = Σ_c w_{i,c} v_c,

over the SAME candidates as ELS with k = k_max (``els_layout.layout``: "circular" with or without
``wrap_patches``; "zeros" with its interior / edge / corner candidate sets, and the local
machine's same-location candidates when k_max ≥ min(H, W)); v_c is the window's centre pixel.
One global softmax per query pixel over all candidates, streamed (``softmax.py``). As σ → ∞
(g ≡ 1; ``sigma=jnp.inf`` is allowed) it is ELS with k = k_max; as σ → 0 it compares centre
pixels only.

The computation (the matmul form with a bank or streamed, and the shift-map kernel) is
``els_jax.engines.soft``; this module turns t into the coefficients a, b² and holds the
machine.

    x0 = els_soft_x0(x, 0.4, images, sigma=1.5, k_max=7, boundary="zeros")
    eps_fn = make_machine("els_soft", images, sigmas=[...], k_max=7, boundary="zeros")

``make_machine("els_soft", ...)`` precomputes the σ-independent candidate windows once (a
bank, identical windows merged with their count when that saves ≥ 10 %) and compiles one
executable for every step: σ is a traced argument. ``calibration.calibrate_sigma`` fits σ per
step to a network (gradient descent through ``SoftMachine.x0_sigma``, or a parabolic search on
forward passes alone).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from els_jax.core import conversions
from els_jax.core import schedules as schedules_lib
from els_jax.core.validation import check_query_and_images, mask_log_weights
from els_jax.core.data import unit_images
from els_jax.engines import layout as els_layout
from els_jax.engines.soft import (ENGINES, SoftBank, SoftSpec, axis_weights, build_soft_bank,
                                  check_k_max, computed_pixels, gaussian_window, pair_count,
                                  pallas_x0, resolve_engine, sample_pixels, shiftmap_x0,
                                  soft_bank_x0, soft_groups, stream_x0)
from els_jax.machines import ideal as ideal_lib
from els_jax.machines.base import Machine, device_images

__all__ = ["els_soft_x0", "els_soft_score", "gaussian_window", "axis_weights", "sigma_for_scale",
           "resolve_engine", "ENGINES", "pair_count",
           "soft_groups", "SoftBank", "SoftSpec", "build_soft_bank", "soft_bank_x0",
           "SoftMachine", "make_soft_machine"]


# The streamed forms by ``resolve_engine``'s answer (a bank is the "xla" form's alternative).
_RUN = {"shiftmap": shiftmap_x0, "xla": stream_x0, "pallas": pallas_x0}


def sigma_for_scale(k: int) -> float:
    """The Gaussian width matching a k×k box window: equal second moment per axis,
    σ² = (k² − 1)/12 (a box of k = 3 ↦ σ ≈ 0.82, 5 ↦ 1.41, 11 ↦ 3.16); at least 0.3 (k = 1,
    a window of one pixel: g = exp(−5.6) ≈ 0.004 on the neighbours)."""
    return max(math.sqrt((int(k) ** 2 - 1) / 12.0), 0.3)


def _check_sigma(sigma):
    """σ as a float32 scalar; a concrete σ must be > 0 (inf allowed: the hard window)."""
    s = jnp.asarray(sigma, jnp.float32)
    if s.ndim != 0:
        raise ValueError(f"sigma must be a scalar (one width per step); got shape {s.shape}")
    if not isinstance(s, jax.core.Tracer) and not float(s) > 0:
        raise ValueError(f"sigma must be > 0 (the Gaussian window's width in pixels; "
                         f"inf = the hard k_max × k_max window); got {float(s)}")
    return s


# ----------------------------------------------------------------------------------------
# The functional API: candidates streamed straight from the images.


def els_soft_x0(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, sigma,
                k_max: int, boundary: str = "circular", wrap_patches: bool = False, mask=None,
                schedule=schedules_lib.Cosine(), block: int = els_layout.DEFAULT_BLOCK,
                engine: str = "auto") -> Float[Array, "b h w c"]:
    """Denoised mean x̂_0 of the els_soft machine, [B, H, W, C] (module docstring).

    Args:
      x: noisy queries [B, H, W, C].
      t: scalar time or one per query [B].
      images: training set [N, H, W, C].
      sigma: the Gaussian window's width in pixels, a scalar > 0 (inf: the hard window,
        = ``els_x0`` with k = k_max). Differentiable (a traced σ is not range-checked).
      k_max: odd size of the window's support (the ELS window size of the candidate layout).
      boundary: "circular" or "zeros"; wrap_patches: circular only (as ``els_x0``).
      mask: optional boolean [N] selecting candidate images (class-conditional).
      schedule: a Schedule or its name.
      block: logits per streamed chunk (memory knob only).
      engine: "auto", "shiftmap", "xla" or "pallas" (the Pallas kernel for GPUs and TPUs; in
        the interpreter on a CPU) (``ENGINES``: the same values to float32 rounding).

        >>> x0 = els_soft_x0(x, 0.4, images, sigma=1.5, k_max=7, boundary="zeros")
        >>> dx0_dsigma = jax.jacfwd(lambda s: els_soft_x0(x, 0.4, images, sigma=s, k_max=7))(1.5)
    """
    check_query_and_images(x, images)
    h, w = x.shape[1], x.shape[2]
    k = check_k_max(k_max, h, w, boundary, wrap_patches)
    sigma = _check_sigma(sigma)
    images = jnp.asarray(unit_images(images), jnp.float32)
    log_w = mask_log_weights(mask, images.shape[0])
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    run = _RUN[resolve_engine(engine)]
    return run(x, coeffs.a, coeffs.b2, sigma, images, log_w, jnp.mean(images, axis=(0, 1, 2)),
               k=k, boundary=boundary, wrap_patches=bool(wrap_patches), block=int(block))


def els_soft_score(x: Float[Array, "b h w c"], t, images: Float[Array, "n h w c"], *, sigma,
                   k_max: int, boundary: str = "circular", wrap_patches: bool = False,
                   mask=None, schedule=schedules_lib.Cosine(),
                   block: int = els_layout.DEFAULT_BLOCK,
                   engine: str = "auto") -> Float[Array, "b h w c"]:
    """Score s = −(x − a·x̂_0)/b² of the els_soft machine, [B, H, W, C]; arguments as
    ``els_soft_x0``.

        >>> s = els_soft_score(x, 0.3, images, sigma=1.0, k_max=5, boundary="circular")
    """
    x0 = els_soft_x0(x, t, images, sigma=sigma, k_max=k_max, boundary=boundary,
                     wrap_patches=wrap_patches, mask=mask, schedule=schedule, block=block,
                     engine=engine)
    x = jnp.asarray(x, jnp.float32)
    coeffs = schedules_lib.query_coefficients(t, x.shape[0], schedule)
    return conversions.x0_to_score_at(x0, x, coeffs)


# ----------------------------------------------------------------------------------------
# The machine as a sampler model.


def _normalise_sigmas(sigmas):
    """(tuple of σ, index 0 = last step, or None; constant σ or None)."""
    if sigmas is None:
        raise ValueError("the 'els_soft' machine needs sigmas (a width > 0 or one per step)")
    if np.ndim(sigmas) == 0:
        values, const = None, float(sigmas)
        check = [const]
    else:
        values = tuple(float(s) for s in np.asarray(sigmas, np.float64).reshape(-1))
        if not values:
            raise ValueError("sigmas is empty")
        const, check = None, values
    for s in check:
        if not s > 0:
            raise ValueError(f"every sigma must be > 0 (inf = the hard window); got {s}")
    return values, const


class SoftMachine(Machine):
    """The els_soft machine as ``eps_fn(x, t, i) -> ε̂``: step i of an m-step run uses
    ``sigmas[m − 1 − i]`` (index 0 = the last, lowest-noise step, as scale lists).

    Attributes: kind "els_soft", sigmas (tuple or None), k_max, num_steps, schedule.
    Methods: sigma(i); x0(x, t, i); x0_sigma(x, t, sigma) (any σ, differentiable: what the
    calibration differentiates); score; __call__ (ε̂); lower; compile; engine."""

    def __init__(self, fn, sigmas, sigma_const, k_max, schedule, info, boundary="circular",
                 wrap_patches=False):
        super().__init__("els_soft", {int(k_max): fn}, None, schedule, int(k_max))
        self._boundary, self._wrap = boundary, bool(wrap_patches)
        self._fn = fn
        self.sigmas = sigmas
        self._sigma_const = sigma_const
        self.k_max = int(k_max)
        self.num_steps = None if sigmas is None else len(sigmas)
        self._info = info

    def sigma(self, i: int) -> float:
        if self.sigmas is None:
            return self._sigma_const
        if not 0 <= i < len(self.sigmas):
            raise ValueError(f"step index {i} is outside the {len(self.sigmas)}-step sigma list")
        return self.sigmas[len(self.sigmas) - 1 - i]

    def patch_size(self, i: int):
        self.sigma(i)                             # checks i
        return self.k_max

    def x0_sigma(self, x, t, sigma, pixels=None):
        """x̂_0 at any width σ (a scalar > 0, or traced: differentiable in x and σ). With
        ``pixels`` (flat indices) only at ``self.computed_pixels(pixels, x.shape)``, 0
        elsewhere, at a cost in proportion (what the width fit uses)."""
        pixels = None if pixels is None else tuple(int(p) for p in np.sort(pixels))
        return self._fn(x, self.coefficients(x, t), _check_sigma(sigma), pixels)

    def x0_sigma_parts(self):
        """(pure, arrays): x̂_0 = pure(x, coeffs, sigma, arrays, pixels) with the machine's
        arrays (its bank, or its images) an argument, so that a function jitted around it
        (the width fit) takes them as inputs instead of baking GBs of constants into its
        executable."""
        return self._fn.pure, self._fn.arrays

    def sample_pixels(self, count: int, shape, seed: int = 0) -> np.ndarray:
        """``sample_pixels`` for this machine's layout and queries of ``shape``."""
        return sample_pixels(self.k_max, self._boundary, self._wrap, shape[1], shape[2],
                             count, seed)

    def computed_pixels(self, pixels, shape) -> np.ndarray:
        """Where ``x0_sigma(..., pixels=pixels)`` computes x̂_0 for queries of ``shape``."""
        return computed_pixels(self.k_max, self._boundary, self._wrap, shape[1], shape[2],
                               pixels)

    def x0_at(self, x, coeffs, i: int):
        return self._fn(x, coeffs, jnp.float32(self.sigma(i)))   # checked when built

    def lower(self, x, t, i: int):
        return self._fn.lower(x, self.coefficients(x, t), jnp.float32(self.sigma(i)))

    def compile(self, x, t=0.5) -> float:
        """Compiles the one executable every step uses (σ is traced). Returns seconds."""
        start = time.perf_counter()
        x = jnp.asarray(x, jnp.float32)
        self._fn.lower(x, self.coefficients(x, t), jnp.float32(1.0)).compile()
        return time.perf_counter() - start

    def engine(self, i: int) -> dict:
        return dict(self._info)

    def bank_spec(self, i: int):
        return getattr(self._fn, "spec", None)

    def __repr__(self):
        return (f"SoftMachine(k_max={self.k_max}, sigmas={self.sigmas or self._sigma_const}, "
                f"num_steps={self.num_steps})")


def make_soft_machine(images, *, sigmas: float | Sequence[float], k_max: int,
                      boundary: str = "circular", wrap_patches: bool = False,
                      schedule=schedules_lib.Cosine(), mask=None,
                      dedup: bool = True, dedup_threshold: float = 0.9,
                      block: int = els_layout.DEFAULT_BLOCK, bank_bytes: int = 2 << 30,
                      engine: str = "auto", compile_for=None, mesh=None) -> SoftMachine:
    """``make_machine("els_soft", ...)``: the els_soft machine as a sampler model.

    Args:
      images: training set [N, H, W, C].
      sigmas: a width σ > 0, or one per step with index 0 = the last (lowest-noise) step.
      k_max: odd support of the Gaussian window (= the ELS window size of the layout).
      boundary, wrap_patches, schedule, mask: as ``els_soft_x0`` / ``make_machine``.
      dedup, dedup_threshold: merge identical candidate windows (exact) when that leaves at
        most ``dedup_threshold`` of them (first estimated on a sample of the images with
        ``els_window.estimate_unique_fraction``, as the ELS machine does).
      block: logits per streamed chunk. bank_bytes: the largest bank to precompute; above it
        candidates are streamed from the images at every call (memory independent of N).
      engine: "auto", "shiftmap" (the fused CPU kernel from the images: no bank), "xla"
        (bank or stream) or "pallas" (the Pallas kernel from the images, for GPUs and TPUs;
        interpreted on a CPU); ``ENGINES``.
      compile_for: optional queries [B, H, W, C]: compile now (one executable for all steps).
      mesh: not supported (candidate sharding is for the hard-window machines).
    """
    if mesh is not None:
        raise ValueError("the 'els_soft' machine does not shard its candidates (mesh=None)")
    schedule = schedules_lib.get(schedule)
    sigma_list, sigma_const = _normalise_sigmas(sigmas)
    given = images
    # uint8 pixels (docs/theory.md §9.2) stay uint8 where the shift-map forms stream them;
    # the bank and the XLA stream read float32.
    pixels_u8 = np.dtype(getattr(images, "dtype", np.float32)) == np.uint8
    images = np.asarray(images) if pixels_u8 else np.asarray(unit_images(images), np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != (images.shape[0],) or not mask.any():
            raise ValueError(f"mask must be a boolean vector over the {images.shape[0]} "
                             f"training images selecting at least one; got {mask.shape}")
        images = images[mask]
    n, h, w, c = images.shape
    k = check_k_max(k_max, h, w, boundary, wrap_patches)
    start = time.perf_counter()
    n_cands = sum(gp.cand_pixels.size for gp in soft_groups(k, boundary, wrap_patches, h, w))
    path = resolve_engine(engine)
    if path == "xla" and n * n_cands * (k * k * c + c + 1) * 4 <= bank_bytes:
        bank, spec = build_soft_bank(images, k_max=k, boundary=boundary,
                                     wrap_patches=wrap_patches, dedup=dedup,
                                     dedup_threshold=dedup_threshold, block=block)

        def pure(x, coeffs, sigma, arrays, pixels=None):
            return soft_bank_x0(jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, sigma,
                                arrays, spec=spec, block=block, pixels=pixels)

        def fn(x, coeffs, sigma, pixels=None):
            return pure(x, coeffs, sigma, bank, pixels)
        fn.pure, fn.arrays = pure, bank
        fn.lower = lambda x, coeffs, sigma: soft_bank_x0.lower(
            jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, jnp.float32(sigma), bank,
            spec=spec, block=block)
        fn.spec = spec
        info = {"engine": "soft", "bank": True, "unique_fraction": spec.unique_fraction}
    else:
        if pixels_u8 and path in ("shiftmap", "pallas"):
            images_j = device_images(given, images)            # held as uint8
            # The per-channel mean (the XLA stream's centring, used for derivatives), read a
            # chunk at a time.
            mu = ideal_lib.image_stats(images_j)[0].reshape(-1, c).mean(axis=0)
        else:
            images_j = device_images(given, np.asarray(unit_images(images), np.float32))
            mu = jnp.mean(images_j, axis=(0, 1, 2))
        log_w = jnp.zeros((n,), jnp.float32)
        kw = dict(k=k, boundary=boundary, wrap_patches=bool(wrap_patches), block=block)
        run = _RUN[path]

        def pure(x, coeffs, sigma, arrays, pixels=None):
            return run(jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, sigma, *arrays,
                       pixels=pixels, **kw)

        def fn(x, coeffs, sigma, pixels=None):
            return pure(x, coeffs, sigma, (images_j, log_w, mu), pixels)
        fn.pure, fn.arrays = pure, (images_j, log_w, mu)
        fn.lower = lambda x, coeffs, sigma: run.lower(
            jnp.asarray(x, jnp.float32), coeffs.a, coeffs.b2, jnp.float32(sigma), images_j,
            log_w, mu, **kw)
        info = {"engine": {"shiftmap": "soft_shiftmap", "pallas": "soft_pallas"}.get(
                    path, "soft"), "bank": False, "unique_fraction": 1.0}
    fn.info = info
    soft = SoftMachine(fn, sigma_list, sigma_const, k, schedule, info, boundary, wrap_patches)
    if compile_for is not None:
        soft.compile(jnp.zeros(np.shape(compile_for) if np.ndim(compile_for) == 4
                               else tuple(compile_for), jnp.float32))
    soft.build_seconds = time.perf_counter() - start
    return soft
