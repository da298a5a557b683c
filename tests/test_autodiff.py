"""Differentiability of every machine and of the sampler (issue 13): under jax.jit, jax.vmap,
jax.jvp and jax.grad w.r.t. the queries each machine gives the float64 oracle's (or the eager
call's) values, forward and reverse mode agree (⟨u, J v⟩ = ⟨Jᵀu, v⟩), the derivative equals
central differences of the float64 oracle (or of the float32 machine where no oracle is
written), and nothing is NaN where the plain rules gave NaN (absent candidates, t near 0 and
1, queries far from every candidate). The fused CPU kernels give the values and their XLA
twins the derivatives. The sampler composes with jit, vmap over seeds and grad w.r.t. x_T."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.machines import els
from els_jax.engines import local
from els_jax.engines import interior as els_interior, layout as els_layout, native, shiftmap
from els_jax.core import schedules, softmax
from tests import oracles

H = W = 6
T = 0.4                                     # moderate t: derivatives O(1/b²) ≈ 3
HAVE_KERNEL = native.available()
NATIVE = "native" if HAVE_KERNEL else "window"


@functools.lru_cache(maxsize=None)
def _data(c, n=8, b=2, seed=0):
    """images [n, H, W, C], queries x on the noisy data manifold at T, directions v and u."""
    rng = np.random.default_rng(seed + 10 * c)
    images = rng.uniform(-1, 1, (n, H, W, c)).astype(np.float32)
    ab = oracles.alpha_bar(T)
    x = (math.sqrt(ab) * images[rng.integers(0, n, b)]
         + math.sqrt(1 - ab) * rng.normal(size=(b, H, W, c))).astype(np.float32)
    v, u = rng.normal(size=(2,) + x.shape).astype(np.float32)
    return images, x, v, u


def _mask(n):
    return np.arange(n) % 3 != 1                    # a third of the images absent


def _score(oracle_x0):
    """float64 oracle score from an oracle x̂_0 (docs/theory.md §1: s = −(x − a·x̂_0)/b²)."""
    def score(x, t, images, **kw):
        ab = oracles.alpha_bar(t)
        return -(x - math.sqrt(ab) * oracle_x0(x, t, images, **kw)) / (1 - ab)
    return score


# name: (C, f(images) → fn(x, t), float64 oracle(x, t, images) of the same output).
# Masks and chunk padding put absent candidates (−inf logits) in the streamed chunks (one
# chunk where the compile time of several would dominate).
PUBLIC = {
    "ideal_score": (1, lambda im: lambda x, t: ej.ideal_score(x, t, im, chunk_size=3),
                    _score(oracles.ideal_x0)),
    "ideal_x0 mask": (2, lambda im: lambda x, t: ej.ideal_x0(x, t, im, mask=_mask(8)),
                      lambda x, t, im: oracles.ideal_x0(x, t, im, mask=_mask(8))),
    "equivariant_score": (1, lambda im: lambda x, t: ej.equivariant_score(x, t, im, block=100),
                          _score(oracles.equivariant_x0)),
    "local_score": (2, lambda im: lambda x, t: ej.local_score(x, t, im, k=3),
                    _score(lambda x, t, im: oracles.local_x0(x, t, im, 3))),
    "local_x0 mask": (1, lambda im: lambda x, t: ej.local_x0(x, t, im, k=5, mask=_mask(8)),
                      lambda x, t, im: oracles.local_x0(x, t, im, 5, mask=_mask(8))),
    "els_score circular": (2, lambda im: lambda x, t: ej.els_score(x, t, im, k=3),
                           _score(lambda x, t, im: oracles.els_x0(x, t, im, 3))),
    "els_x0 circular wrap mask": (
        2, lambda im: lambda x, t: ej.els_x0(x, t, im, k=3, wrap_patches=True, mask=_mask(8)),
        lambda x, t, im: oracles.els_x0(x, t, im, 3, "circular", True, mask=_mask(8))),
    "els_score zeros mask": (
        1, lambda im: lambda x, t: ej.els_score(x, t, im, k=3, boundary="zeros",
                                                mask=_mask(8)),
        _score(lambda x, t, im: oracles.els_x0(x, t, im, 3, "zeros", mask=_mask(8)))),
    # els_soft's own softmax (engines/soft.py: the chunk's state merged into the running one)
    "els_soft_x0 zeros": (
        1, lambda im: lambda x, t: ej.els_soft_x0(x, t, im, sigma=1.2, k_max=3,
                                                  boundary="zeros"),
        lambda x, t, im: oracles.els_soft_x0(x, t, im, 1.2, 3, "zeros")),
}


def _eps(oracle_x0):
    """float64 oracle noise prediction from an oracle x̂_0 (docs/theory.md §1: ε̂ = (x − a·x̂_0)/b)."""
    def eps(x, t, images):
        ab = oracles.alpha_bar(t)
        return (x - math.sqrt(ab) * oracle_x0(x, t, images)) / math.sqrt(1 - ab)
    return eps


def _machine(kind, c, oracle_x0, **kw):
    def build(images):
        m = ej.make_machine(kind, images, dedup_threshold=1.0, **kw)
        return lambda x, t: m(x, t, 0)
    return c, build, _eps(oracle_x0)


# Every make_machine kind, both boundaries, banked (padded with absent candidates), the row
# engine and the fused kernels (values) with their XLA twins (derivatives). The zero-padded
# "native" machine (with a kernel, else "window") also covers the banked border engine. A
# machine over ``bank_bytes`` streams with exactly the computation of els_score (PUBLIC).
MACHINES = {
    "machine ideal": _machine("ideal", 1, oracles.ideal_x0),
    "machine equivariant mask": _machine(
        "equivariant", 2, lambda x, t, im: oracles.equivariant_x0(x, t, im, mask=_mask(8)),
        mask=_mask(8), block=100),
    "machine local": _machine("local", 2, lambda x, t, im: oracles.local_x0(x, t, im, 3),
                              scales=3),
    "machine els circular window mask": _machine(
        "els", 1, lambda x, t, im: oracles.els_x0(x, t, im, 3, mask=_mask(8)),
        scales=3, method="window", mask=_mask(8), chunk=16),
    "machine els circular row": _machine(
        "els", 1, lambda x, t, im: oracles.els_x0(x, t, im, 3),
        scales=3, method="row"),
    f"machine els zeros {NATIVE} mask": _machine(
        "els", 1, lambda x, t, im: oracles.els_x0(x, t, im, 5, "zeros", mask=_mask(8)),
        scales=5, boundary="zeros", method=NATIVE, dedup=False, mask=_mask(8)),
}


def _shiftmap_own(boundary, wrap, k, mask=None):
    """The shift-map engine's jnp form with its own derivatives (no reference twin): the
    coefficients from t as the machines compute them. Under jit its forward mode gave NaN
    tangents until the softmax's running max was held constant under differentiation."""
    def build(images):
        log_w = None if mask is None else jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)

        def f(x, t):
            co = schedules.query_coefficients(t, x.shape[0], schedules.Cosine())
            return shiftmap.shiftmap_x0(x, co.a, co.b2, images, log_w, k=k, boundary=boundary,
                                        wrap_patches=wrap, engine="xla")
        return f
    return build


MACHINES.update({
    "shiftmap jnp circular wrap mask": (
        1, _shiftmap_own("circular", True, 3, _mask(8)),
        lambda x, t, im: oracles.els_x0(x, t, im, 3, "circular", True, mask=_mask(8))),
    "shiftmap jnp zeros": (
        2, _shiftmap_own("zeros", False, 5),
        lambda x, t, im: oracles.els_x0(x, t, im, 5, "zeros")),
})


def _all_modes(f):
    """One compiled program: the jvp (values and J v), the gradient of ⟨u, f⟩ and the vmap
    over the batch, at a traced time t."""
    @jax.jit
    def run(x, t, v, u):
        y, jv = jax.jvp(lambda z: f(z, t), (x,), (v,))
        g = jax.grad(lambda z: jnp.vdot(u, f(z, t)))(x)
        yv = jax.vmap(lambda xi: f(xi[None], t)[0])(x)
        return y, jv, g, yv
    return run


def _central(f, x, v, h):
    """(f(x + h·v) − f(x − h·v)) / 2h, differences taken in float64."""
    return (np.asarray(f(x + h * v), np.float64) - np.asarray(f(x - h * v), np.float64)) / (2 * h)


@pytest.mark.parametrize("name", list(PUBLIC) + list(MACHINES))
def test_every_mode_agrees_and_is_finite(name):
    c, build, oracle = {**PUBLIC, **MACHINES}[name]
    images, x, v, u = _data(c)
    f = build(images)
    t = jnp.float32(T)
    run = _all_modes(f)
    yj, jv, g, yv = (np.asarray(r) for r in run(x, t, v, u))
    # The tangent alone (the primal unused, as in jit(grad) or a custom rule's reference):
    # XLA fuses the logits differently there, and a select that capped logit − max at 0 gave
    # the maximal logit, rounded an ulp above the max, a zero tangent (softmax.capped_at_zero).
    alone = jax.jit(lambda x, t, v: jax.jvp(lambda z: f(z, t), (x,), (v,))[1])(x, t, v)
    np.testing.assert_allclose(np.asarray(alone), jv, atol=1e-4 * max(1.0, np.abs(jv).max()))
    # Values under jit and vmap: the float64 oracle's (the sampler test compares jit with
    # eager calls).
    y = oracle(x.astype(np.float64), T, images)
    np.testing.assert_allclose(yj, y, atol=3e-4 * max(1.0, np.abs(y).max()))
    np.testing.assert_allclose(yv, yj, atol=1e-5)
    assert np.all(np.isfinite(jv)) and np.all(np.isfinite(g))
    # Forward and reverse mode: ⟨u, J v⟩ = ⟨Jᵀu, v⟩.
    fwd, rev = np.vdot(u, jv), np.vdot(g, v)
    np.testing.assert_allclose(fwd, rev, rtol=1e-4, atol=1e-4 * np.abs(jv).sum())
    # Against central differences of the float64 oracle (the exact function of docs/theory.md §2).
    fd = _central(lambda z: oracle(z, T, images), x.astype(np.float64), v, 1e-4)
    scale = np.abs(fd).max()
    assert scale > 0.1                                         # a real derivative
    np.testing.assert_allclose(jv, fd, atol=2e-3 * scale)
    # The same program at the extremes: t near 0 and 1, queries far from every candidate
    # (the plain rules gave NaN there in forward mode).
    far = np.stack([np.full(x.shape[1:], 1e3), np.full(x.shape[1:], -50.0)]).astype(np.float32)
    for tt in (1e-5, 0.02, 1.0):
        for xx in (x, far):
            outs = run(xx, jnp.float32(tt), v, u)
            assert all(np.all(np.isfinite(np.asarray(r))) for r in outs), (tt, xx[0, 0, 0])


def test_the_causes_of_nan_tangents():
    """Where forward mode gave NaN: (1) an absent candidate's log w = −inf in an augmented key
    met the query's constant 1, whose tangent is 0 (0·(−inf) = NaN in the matmul's tangent);
    (2) a query whose exponentials all underflowed (total 0) divided 0 by total² = 0 in the
    tangent of finalize. (3), a logit that XLA recomputed one ulp above the max at b² ≈ 1e-12
    (exp(+1e5) = inf), happens only inside compiled programs: the t = 1e-5 runs of
    test_every_mode_agrees_and_is_finite cover it."""
    rng = np.random.default_rng(0)
    q = jnp.concatenate([jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                         jnp.ones((3, 1))], axis=1)                      # [(a/b²)q, …, 1]
    keys = jnp.asarray(rng.normal(size=(5, 5)), jnp.float32).at[1:3, -1].set(-jnp.inf)
    dq = jnp.zeros_like(q).at[:, :-1].set(1.0)
    _, plain = jax.jvp(lambda q: q @ keys.T, (q,), (dq,))
    assert np.isnan(np.asarray(plain)).any()                             # the old rule
    logits, tangent = jax.jvp(lambda q: els_layout.augmented_logits(els_layout.matmul_keys, q, keys),
                              (q,), (dq,))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(q @ keys.T))
    # The plain tangent wherever it is finite; absent candidates (weight exactly 0) get the
    # tangent of their finite key entries.
    want = np.asarray(dq @ jnp.where(jnp.isfinite(keys), keys, 0.0).T)
    np.testing.assert_allclose(np.asarray(tangent), want, rtol=1e-6)
    finite = np.isfinite(np.asarray(plain))
    np.testing.assert_allclose(np.asarray(tangent)[finite], np.asarray(plain)[finite], rtol=1e-6)
    # (2) an underflowed or empty state: value 0, finite tangent.
    empty = softmax.SoftmaxState(jnp.zeros(2), jnp.zeros(2), jnp.zeros((2, 3)))
    y, dy = jax.jvp(softmax.finalize, (empty,), (jax.tree.map(jnp.ones_like, empty),))
    assert np.all(np.asarray(y) == 0) and np.all(np.isfinite(np.asarray(dy)))


def test_derivative_in_t():
    """d/dt through a kernel-backed machine (a, b² from the schedule, differentiated through
    the XLA twin) agrees with central differences."""
    images, x, _, _ = _data(2)
    f = PUBLIC["local_score"][1](images)
    _, dt = jax.jvp(lambda t: f(x, t), (jnp.float32(T),), (jnp.float32(1.0),))
    fd = _central(lambda t: f(x, t), jnp.float32(T), jnp.float32(1.0), 1e-3)
    np.testing.assert_allclose(np.asarray(dt), fd, atol=5e-3 * np.abs(fd).max())


# ---------------------------------------------------------------- the fused CPU kernels


@pytest.mark.skipif(not HAVE_KERNEL, reason="no C++ compiler here")
def test_local_kernel_values_with_xla_derivatives():
    """The LS state under jvp: values are the kernel's, tangents the XLA path's (reverse
    mode, transposed from them, is checked by test_every_mode_agrees_and_is_finite); the
    differentiated program still calls the kernel."""
    images, x, v, _ = _data(2, n=12)
    k, t, sched = 3, jnp.float32(T), schedules.Cosine()
    bank = local.build_local_bank(local.transpose_images(images), k=k)
    log_w = jnp.where(jnp.asarray(_mask(12)), 0.0, -jnp.inf)

    coeffs = schedules.query_coefficients(t, x.shape[0], sched)
    a, b2 = coeffs.a.reshape(-1, 1, 1, 1), coeffs.b2.reshape(-1, 1, 1, 1)

    def fused(x):               # the machines' path: kernel values, XLA derivatives
        return local._local_bank_state(x, coeffs.a, coeffs.b2, bank, log_w, k, 1 << 16,
                                       "kernel")

    def xla(x):                 # the XLA path alone
        return local._local_bank_state_q(local.local_queries(x, a, bank.mean), a, b2, bank,
                                         log_w, k, 1 << 16)

    kernel = native.local_softmax_state(local.local_queries(jnp.asarray(x), a, bank.mean),
                                        a.reshape(-1), b2.reshape(-1), bank.centred_and_ones,
                                        bank.half_sq, log_w, k)
    state, tangent = jax.jit(lambda x, v: jax.jvp(fused, (x,), (v,)))(x, v)
    _, tangent_xla = jax.jit(lambda x, v: jax.jvp(xla, (x,), (v,)))(x, v)
    for got, want in zip(state, kernel):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, want in zip(tangent, tangent_xla):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    hlo = jax.jit(lambda x, v: jax.jvp(fused, (x,), (v,))).lower(x, v).as_text()
    assert "els_local_softmax" in hlo


@pytest.mark.skipif(not HAVE_KERNEL, reason="no C++ compiler here")
def test_interior_kernel_values_with_twin_derivatives():
    """The zero-padded interior pass: its XLA twin computes the kernel's state (several
    chunks, absent images), and under jvp the values are the kernel's, the tangents the
    twin's."""
    images, x, v, _ = _data(2, n=12)
    k, block = 3, 200
    bank, _ = els.build_bank(images, k=k, boundary="zeros", method="native", dedup=False)
    bank = bank._replace(interior=bank.interior._replace(
        log_w=bank.interior.log_w.at[1::3].set(-jnp.inf)))
    a, b2 = schedules.query_coefficients(jnp.float32(T), x.shape[0], schedules.Cosine())
    mu = bank.mu[None, None, None, :]
    q = jnp.asarray(x) - a[:, None, None, None] * mu
    ib = bank.interior
    kernel = native.interior_softmax_state(q, a, b2, ib.centred, ib.half_sq, ib.log_w, k)
    kernel_x0 = softmax.finalize(softmax.SoftmaxState(*kernel)) + mu

    def fused(x):
        return els_interior.interior_result(x, a, b2, k, bank.interior, bank.mu, None, block)[1]

    def twin(x):
        state = els_interior.interior_state_xla(x - a[:, None, None, None] * mu, a, b2, ib, k,
                                                block)
        return softmax.finalize(state) + mu, state.max

    fused_jvp = jax.jit(lambda x, v: jax.jvp(fused, (x,), (v,)))
    assert "els_interior_softmax" in fused_jvp.lower(x, v).as_text()     # values: the kernel
    y, jv = fused_jvp(x, v)
    (y_twin, max_twin), (jv_twin, _) = jax.jit(lambda x, v: jax.jvp(twin, (x,), (v,)))(x, v)
    np.testing.assert_allclose(np.asarray(max_twin), np.asarray(kernel[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y_twin), np.asarray(kernel_x0), atol=2e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(kernel_x0).reshape(y.shape), atol=1e-6)
    np.testing.assert_allclose(np.asarray(jv), np.asarray(jv_twin).reshape(jv.shape),
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- the sampler


def test_sampler_composes_with_jit_vmap_and_grad():
    """jit, vmap over seeds (their x_T), and the gradient of one final pixel w.r.t. the noise
    x_T, for a machine with a per-step scale list (LS, the kernel where available): eager
    values, forward = reverse mode, and the gradient vanishes outside the receptive field of
    the two steps (radius 2 + 1). (NumPy noise: jax.random.normal takes seconds to compile
    on XLA:CPU.)"""
    images, _, _, _ = _data(1)
    machine = ej.make_machine("local", images, scales=[3, 5])
    times = ej.uniform_times(2, t_max=0.8)
    rng = np.random.default_rng(3)
    x_T = rng.normal(size=(3, 1, H, W, 1)).astype(np.float32)            # 3 seeds
    eager = np.stack([np.asarray(ej.sample(machine, x, times)) for x in x_T])
    jitted = jax.jit(lambda x: ej.sample(machine, x, times))
    np.testing.assert_allclose(np.asarray(jitted(x_T[0])), eager[0], atol=1e-5)
    seeds = jax.jit(jax.vmap(lambda x: ej.sample(machine, x, times)))(x_T)
    np.testing.assert_allclose(np.asarray(seeds), eager, atol=1e-5)

    def pixel(x):                                   # the final sample's corner pixel
        return ej.sample(machine, x, times)[0, 0, 0, 0]
    v = rng.normal(size=x_T[0].shape).astype(np.float32)
    jv, g = jax.jit(lambda x, v: (jax.jvp(pixel, (x,), (v,))[1], jax.grad(pixel)(x)))(x_T[0], v)
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(float(jv), np.vdot(g, v), rtol=1e-4, atol=1e-5)
    assert np.abs(g[0, :4, :4]).max() > 1e-3
    assert np.all(g[0, 4:] == 0) and np.all(g[0, :, 4:] == 0)


def test_sampler_with_a_traced_grid():
    """The grid may be a jit argument (its values unchecked, its length static)."""
    def eps_fn(x, t, i):
        return jnp.tanh(x) * (0.5 + 0.1 * i) + 0.1 * t
    x = np.random.default_rng(0).normal(size=(2, H, W, 1)).astype(np.float32)
    times = ej.uniform_times(2, t_max=0.9)
    traced, closed = jax.jit(lambda x, tt: (ej.sample(eps_fn, x, tt),
                                            ej.sample(eps_fn, x, times)))(x, times)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(closed), rtol=1e-6, atol=1e-6)
