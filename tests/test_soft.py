"""The els_soft machine (docs/theory.md §7): against a float64 oracle for both boundaries, the σ → ∞
limit = ELS with k = k_max, gradients in x and σ, the machine wrapper, and the calibration of
σ by gradient descent recovering known widths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.engines import soft as soft_engine
from els_jax.machines import soft
from tests import oracles

H, W, C = 7, 6, 2
# (boundary, wrap_patches, k_max): k_max = 7 ≥ min(H, W) with zero padding is the local
# machine's layout (docs/theory.md §2 notes).
CONFIGS = [("circular", False, 3), ("circular", True, 5), ("zeros", False, 3),
           ("zeros", False, 7)]


def _setup(t, n=3, b=2, seed=0, shape=(H, W, C)):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(n,) + shape).astype(np.float32)
    ab = oracles.alpha_bar(t)
    x = (math.sqrt(ab) * images[rng.integers(0, n, size=b)]
         + math.sqrt(1 - ab) * rng.normal(size=(b,) + shape)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(images)


def _close(got, want, tol=3e-4):
    np.testing.assert_allclose(np.asarray(got), want, atol=tol)


def _engines():
    """Both engines where the fused kernels build (the shift-map kernel is the default on a
    CPU), else the XLA form alone."""
    from els_jax.engines import native
    return ["shiftmap", "xla"] if native.available() else ["xla"]


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("boundary,wrap,k", CONFIGS)
def test_matches_oracle_and_els_at_infinite_sigma(boundary, wrap, k, engine):
    kw = dict(k_max=k, boundary=boundary, wrap_patches=wrap, block=50, engine=engine)
    for t, sigma in [(0.01, 1.1), (0.02, 0.7), (0.5, 1.6), (0.95, 3.0)]:
        x, images = _setup(t)
        want = oracles.els_soft_x0(x, t, images, sigma, k, boundary, wrap)
        _close(soft.els_soft_x0(x, t, images, sigma=sigma, **kw), want)
    # σ → ∞: the hard k_max window, i.e. ELS (and for zeros with k_max ≥ H, LS).
    x, images = _setup(0.4)
    hard = ej.els_x0(x, 0.4, images, k=k, boundary=boundary, wrap_patches=wrap)
    _close(ej.els_soft_x0(x, 0.4, images, sigma=jnp.inf, **kw), hard, tol=2e-6)
    _close(ej.els_soft_x0(x, 0.4, images, sigma=1e4, **kw), hard, tol=1e-5)
    if boundary == "zeros" and k == 3:       # a class mask: candidates of 2 of the 3 images
        mask = np.array([True, False, True])
        _close(soft.els_soft_x0(x, 0.4, images, sigma=1.3, mask=jnp.asarray(mask), **kw),
               oracles.els_soft_x0(x, 0.4, images, 1.3, k, boundary, wrap, mask=mask))


def test_circular_commutes_with_translation_and_stays_in_the_data_range():
    """With wrapping windows every translate of a candidate is a candidate: equivariance.
    x̂_0 is a convex combination of pixel values, also at t = 0 and 1 and for far queries."""
    kw = dict(sigma=1.2, k_max=5, boundary="circular", wrap_patches=True, block=50)
    x, images = _setup(0.3)
    x0 = soft.els_soft_x0(x, 0.3, images, **kw)
    shifted = soft.els_soft_x0(jnp.roll(x, (2, -1), axis=(1, 2)), 0.3, images, **kw)
    _close(shifted, jnp.roll(x0, (2, -1), axis=(1, 2)), tol=1e-5)
    ab = oracles.alpha_bar(0.3)
    _close(ej.els_soft_score(x, 0.3, images, **kw),
           -(np.asarray(x) - math.sqrt(ab) * np.asarray(x0)) / (1 - ab), tol=1e-3)
    lo, hi = float(images.min()), float(images.max())
    for t, scale in [(0.0, 1.0), (1e-4, 1.0), (1.0, 1.0), (0.5, 1e3)]:
        got = np.asarray(soft.els_soft_x0(x * scale, t, images, **kw))
        assert np.all(np.isfinite(got)) and got.min() >= lo - 1e-5 and got.max() <= hi + 1e-5


@pytest.mark.parametrize("engine", _engines())
def test_gradients_in_x_and_sigma(engine):
    """jax.grad (reverse, through the rematerialised scan) and jax.jvp (forward) agree with
    each other and with central differences; finite at t near 0 and 1. Zero padding: the
    interior, edge and corner groups (the circular machine's gradients drive
    test_calibration_recovers_known_sigmas). The shift-map kernel's values with the XLA
    form's derivatives pass the same checks."""
    kw = dict(k_max=3, boundary="zeros", block=50, engine=engine)
    x, images = _setup(0.5, shape=(6, 6, 2))
    rng = np.random.default_rng(3)
    weights = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    direction = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))

    def f(x, sigma, t):
        return jnp.sum(weights * soft.els_soft_x0(x, t, images, sigma=sigma, **kw))

    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    t = jnp.float32(0.5)
    _, (gx, gs) = value_and_grad(x, jnp.float32(1.3), t)
    _, tangent = jax.jit(lambda x, s, t: jax.jvp(lambda x, s: f(x, s, t), (x, s),
                                                 (direction, jnp.float32(1.0))))(
        x, jnp.float32(1.3), t)
    np.testing.assert_allclose(float(tangent), float(jnp.sum(gx * direction) + gs), rtol=1e-4)

    def value(x, sigma):
        return float(value_and_grad(x, jnp.float32(sigma), t)[0])
    h = 1e-2
    fd_sigma = (value(x, 1.3 + h) - value(x, 1.3 - h)) / (2 * h)
    fd_x = (value(x + h * direction, 1.3) - value(x - h * direction, 1.3)) / (2 * h)
    np.testing.assert_allclose(float(gs), fd_sigma, rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(float(jnp.sum(gx * direction)), fd_x, rtol=2e-2, atol=1e-3)
    for t_edge in (1e-3, 1.0):
        val, grads = value_and_grad(x, jnp.float32(1.3), jnp.float32(t_edge))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in (val,) + grads)


def test_machine_selects_sigma_by_step_and_merges_identical_windows():
    """make_machine("els_soft"): step i uses sigmas[m − 1 − i]; the bank (identical
    background windows merged with their count) gives the functional result; the sampler
    drives it."""
    rng = np.random.default_rng(5)
    images = -np.ones((3, H, W, C), np.float32)           # blank background, a small blob
    for i, (r, c) in enumerate([(1, 1), (3, 2), (4, 4)]):
        images[i, r:r + 2, c:c + 2] = rng.uniform(-1, 1, size=(2, 2, C))
    mask = np.array([True, False, True])
    sigmas = [0.6, 1.1, 2.5]                              # index 0 = last step
    machine = ej.make_machine("els_soft", images, sigmas=sigmas, k_max=3, boundary="zeros",
                              mask=mask, method="xla")
    assert machine.num_steps == 3 and machine.engine(0)["bank"]
    assert machine.engine(0)["unique_fraction"] < 0.9     # windows were merged
    x = jnp.asarray(rng.normal(size=(2, H, W, C)).astype(np.float32))
    for i, t in enumerate([0.9, 0.5, 0.1]):
        assert machine.sigma(i) == sigmas[2 - i]
        want = soft.els_soft_x0(x, t, images, sigma=sigmas[2 - i], k_max=3, boundary="zeros",
                                mask=jnp.asarray(mask), block=50)
        _close(machine.x0(x, jnp.float32(t), i), want, tol=2e-5)
        if "shiftmap" in _engines():         # the default on a CPU: the images, no bank
            fast = ej.make_machine("els_soft", images, sigmas=sigmas, k_max=3,
                                   boundary="zeros", mask=mask)
            assert fast.engine(i)["engine"] == "soft_shiftmap" and not fast.engine(i)["bank"]
            _close(fast.x0(x, jnp.float32(t), i), want, tol=2e-5)
    out = ej.sample(machine, x, ej.uniform_times(3))
    assert np.all(np.isfinite(np.asarray(out)))
    with pytest.raises(ValueError, match="3 steps"):
        ej.sample(machine, x, ej.uniform_times(4))


def test_errors():
    x, images = _setup(0.5)
    kw = dict(k_max=3, boundary="circular")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            soft.els_soft_x0(x, 0.5, images, sigma=bad, **kw)
    with pytest.raises(ValueError, match="scalar"):
        soft.els_soft_x0(x, 0.5, images, sigma=jnp.ones(2), **kw)
    with pytest.raises(ValueError, match="odd"):
        soft.els_soft_x0(x, 0.5, images, sigma=1.0, k_max=4)
    with pytest.raises(ValueError, match="larger than the 7×6 image"):
        soft.els_soft_x0(x, 0.5, images, sigma=1.0, k_max=7, boundary="circular")
    with pytest.raises(ValueError, match="exceeds"):
        soft.els_soft_x0(x, 0.5, images, sigma=1.0, k_max=15, boundary="zeros")
    with pytest.raises(ValueError, match="boundary"):
        soft.els_soft_x0(x, 0.5, images, sigma=1.0, k_max=3, boundary="reflect")
    with pytest.raises(ValueError, match="sigma"):
        ej.make_machine("els_soft", images, sigmas=[1.0, -2.0], k_max=3)
    with pytest.raises(ValueError, match="needs sigmas"):
        ej.make_machine("els_soft", images, k_max=3)
    with pytest.raises(ValueError, match="not scales"):
        ej.make_machine("els_soft", images, scales=3, sigmas=1.0, k_max=3)
    with pytest.raises(ValueError, match="els_soft"):
        ej.make_machine("els", images, scales=3, sigmas=1.0)


def _known_widths(boundary):
    """A "network" that is an els_soft machine of known widths per step (index 0 = last
    step) on 16 random 8×8 images, 4 seeds and a 3-step grid."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
    true = [0.8, 1.3, 2.0]
    network = ej.make_machine("els_soft", images, sigmas=true, k_max=5, boundary=boundary)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    return images, true, network, x_T, ej.uniform_times(3, t_max=0.8, t_min=0.2)


def test_calibration_recovers_known_sigmas():
    """The "network" is itself an els_soft machine with known widths per step; fitting σ along
    its trajectory by gradient descent must find them (a test that can fail: with Adam's
    default moments, β1 = 0.9 and β2 = 0.999, it found 0.61, 1.25, 2.22)."""
    images, true, network, x_T, times = _known_widths("circular")
    cal = ej.calibrate_sigma(network, images, x_T, times, k_max=5, boundary="circular",
                             init_scales=[5, 1, 1], steps=50)   # σ 1.41, 0.3, 0.3
    np.testing.assert_allclose(cal.sigmas, true, rtol=0.04)
    np.testing.assert_allclose(cal.init, [0.3, 0.3, soft.sigma_for_scale(5)])
    assert np.all(cal.cosine_after >= cal.cosine_before - 1e-6)
    assert np.all(cal.cosine_after > 1 - 1e-5) and np.all(cal.cosine_before < 1 - 1e-5)
    assert cal.loss.shape == (3, 50)


def test_forward_mode_fit_derivative_is_the_gradient_and_subset_fit_recovers_sigmas():
    """calibrate_sigma takes d loss / d log σ by one jax.jvp: for the scalar it equals
    jax.grad's. Fitting on the cosine over a fixed subset of the pixels (fit_pixels) of a
    "network" that is an els_soft machine still finds its widths (the candidates are all
    there). A subset of the images (fit_images) is what fit_subset says, and it biases σ
    down: fewer candidates match wide windows less well."""
    from els_jax.experiment.calibration import fit_subset
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (24, 8, 8, 1)).astype(np.float32)
    machine = soft.make_soft_machine(images, sigmas=1.0, k_max=5, boundary="zeros")
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))

    def loss(log_sigma):
        return jnp.sum(jnp.sin(3 * machine.x0_sigma(x, 0.4, jnp.exp(log_sigma))))
    p = jnp.float32(np.log(1.3))
    _, forward = jax.jvp(loss, (p,), (jnp.ones_like(p),))
    np.testing.assert_allclose(float(forward), float(jax.grad(loss)(p)), rtol=1e-4)

    sub = fit_subset(images, None, 10, seed=0)
    assert sub.shape == (10, 8, 8, 1)
    rows = [int(np.flatnonzero((images == s).all(axis=(1, 2, 3)))[0]) for s in sub]
    assert rows == sorted(rows) and len(set(rows)) == 10          # distinct, in order
    np.testing.assert_array_equal(fit_subset(images, None, 10, seed=0), sub)   # fixed
    mask = np.arange(24) % 2 == 0
    np.testing.assert_array_equal(fit_subset(images, mask, 100), images[mask])
    with pytest.raises(ValueError, match="fit_images"):
        fit_subset(images, None, 0)

    true = [0.9, 1.6]                                     # index 0 = last step
    network = ej.make_machine("els_soft", images, sigmas=true, k_max=5, boundary="zeros")
    x_T = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    times = ej.uniform_times(2, t_max=0.7, t_min=0.2)
    cal = ej.calibrate_sigma(network, images, x_T, times, k_max=5, boundary="zeros",
                             init_scales=[3, 3], steps=30, fit_pixels=20)
    np.testing.assert_allclose(cal.sigmas, true, rtol=0.05)
    assert cal.engine == "soft" and 20 <= cal.pixels < 64          # Adam: the XLA form
    fewer = ej.calibrate_sigma(network, images, x_T, times, k_max=5, boundary="zeros",
                               init_scales=[3, 3], steps=30, fit_images=12)
    assert np.all(np.asarray(fewer.sigmas) < 0.9 * np.asarray(true))
    with pytest.raises(ValueError, match="fit_pixels"):
        ej.calibrate_sigma(network, images, x_T, times, k_max=5, fit_pixels=0)


@pytest.mark.parametrize("boundary,k_max,bank", [("zeros", 5, True), ("zeros", 5, False),
                                                 ("circular", 3, True), ("zeros", 9, True),
                                                 ("zeros", 5, "shiftmap")])
def test_x0_at_a_subset_of_pixels_is_the_full_x0_there(boundary, k_max, bank):
    """SoftMachine.x0_sigma(pixels=...) (what the width fit uses) computes x̂_0 exactly at
    computed_pixels ⊇ the given ones (zero padding: whole edge groups) and 0 elsewhere, from a
    bank, when streaming and by the shift-map kernel, and its σ-derivative there is the full
    machine's."""
    if bank == "shiftmap" and bank not in _engines():
        pytest.skip("the fused kernels do not build here")
    rng = np.random.default_rng(5)
    images = rng.uniform(-1, 1, (9, 8, 8, 1)).astype(np.float32)
    machine = soft.make_soft_machine(images, sigmas=1.0, k_max=k_max, boundary=boundary,
                                     bank_bytes=(2 << 30) if bank is True else 0,
                                     engine="shiftmap" if bank == "shiftmap" else "xla")
    assert machine.engine(0)["bank"] is (bank is True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    pixels = np.sort(rng.choice(64, 11, replace=False))
    done = machine.computed_pixels(pixels, x.shape)
    assert set(pixels) <= set(done.tolist()) and len(done) < 64
    full = np.asarray(machine.x0_sigma(x, 0.4, 1.3)).reshape(2, 64)
    part = np.asarray(machine.x0_sigma(x, 0.4, 1.3, pixels)).reshape(2, 64)
    np.testing.assert_allclose(part[:, done], full[:, done], rtol=1e-5, atol=1e-6)
    rest = np.setdiff1d(np.arange(64), done)
    assert np.all(part[:, rest] == 0.0)
    d_full = jax.jacfwd(lambda s: machine.x0_sigma(x, 0.4, s))(1.3)
    d_part = jax.jacfwd(lambda s: machine.x0_sigma(x, 0.4, s, pixels))(1.3)
    np.testing.assert_allclose(np.asarray(d_part).reshape(2, 64)[:, done],
                               np.asarray(d_full).reshape(2, 64)[:, done], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("boundary,k_max,size", [("zeros", 9, 32), ("zeros", 5, 8),
                                                 ("circular", 5, 16)])
def test_sample_pixels_counts_what_is_computed(boundary, k_max, size):
    """fit_pixels is a cost: sample_pixels draws whole units (a pixel, or a zero-padded edge
    group) until they cover the count, so the computed set has the count, plus at most one
    unit, and no pixel twice; fixed by the seed, different for another."""
    units = soft_engine.pixel_units(k_max, boundary, False, size, size)
    assert sorted(np.concatenate(units).tolist()) == list(range(size * size))   # a partition
    biggest = max(len(u) for u in units)
    for count in (1, 20, size * size // 3):
        p = soft.sample_pixels(k_max, boundary, False, size, size, count, seed=0)
        done = soft_engine.computed_pixels(k_max, boundary, False, size, size, p)
        assert len(np.unique(p)) == len(p)
        np.testing.assert_array_equal(done, p)
        assert count <= len(done) < count + biggest
    first = soft.sample_pixels(k_max, boundary, False, size, size, 20, 0)
    np.testing.assert_array_equal(soft.sample_pixels(k_max, boundary, False, size, size, 20, 0),
                                  first)
    assert not np.array_equal(soft.sample_pixels(k_max, boundary, False, size, size, 20, 0),
                              soft.sample_pixels(k_max, boundary, False, size, size, 20, 1))


def test_parabolic_search_finds_the_minimum_within_its_budget():
    """On a quadratic the first parabola's vertex is the minimum; on a non-quadratic valley
    (and from a start on its far, flat side) it gets close in a few evaluations more; it never
    evaluates more than asked, never returns a point worse than its start, and keeps [lo, hi]."""
    from els_jax.experiment.calibration import parabolic_search
    calls = []

    def quad(p):
        calls.append(p)
        return (p - 0.37) ** 2
    p, f, f0, seen = parabolic_search(quad, 0.0, evals=5)
    assert abs(p - 0.37) < 1e-9 and f < 1e-15 and f0 == pytest.approx(0.37 ** 2)
    assert len(calls) == len(seen) == 4                       # stopped: the next is a repeat
    p, _, _, seen = parabolic_search(lambda p: -np.exp(-(p + 0.8) ** 2), 0.0, evals=8)
    assert abs(p + 0.8) < 0.02 and len(seen) <= 8
    p, f, f0, _ = parabolic_search(lambda p: np.cosh(3 * (p - 2.0)), 0.0, evals=4, hi=1.0)
    assert p <= 1.0 and f <= f0
    p, _, _, seen = parabolic_search(lambda p: abs(p - 0.1), 0.0, evals=3)
    assert len(seen) == 3 and p == 0.0
    with pytest.raises(ValueError, match="at least 3"):
        parabolic_search(quad, 0.0, evals=2)


def test_search_calibration_recovers_known_sigmas():
    """method="search" (forward passes only, the machine on its default engine) finds the
    widths of a "network" that is an els_soft machine, from starts ~40 % off, with 8
    evaluations per step; its loss history holds the evaluations."""
    images, true, network, x_T, times = _known_widths("zeros")
    cal = ej.calibrate_sigma(network, images, x_T, times, k_max=5, boundary="zeros",
                             init_sigmas=[1.2, 0.8, 1.4], steps=8, method="search")
    np.testing.assert_allclose(cal.sigmas, true, rtol=0.03)
    assert np.all(cal.cosine_after >= cal.cosine_before)
    assert cal.loss.shape == (3, 8) and cal.pixels == 64
    assert cal.engine == ("soft_shiftmap" if "shiftmap" in _engines() else "soft")
    np.testing.assert_allclose(cal.loss.min(axis=1), -cal.cosine_after, rtol=1e-6)
    with pytest.raises(ValueError, match="method"):
        ej.calibrate_sigma(network, images, x_T, times, k_max=5, method="newton")


def test_search_fit_takes_the_cheaper_engine():
    """A search fit with fit_pixels runs the XLA form on the subset when that costs fewer
    multiply-adds than the shift-map kernel over every pixel (k_max = 9 on 32×32, 128
    pixels), else the kernel over every pixel (k_max = 29: a 4×4 interior, few pairs); the
    pair counts it compares are the layout's (the shift-map engine's own count)."""
    from els_jax.engines import shiftmap
    from els_jax.experiment.calibration import _search_engine
    for k in (3, 9, 29):
        assert soft.pair_count(k, "zeros", False, 32, 32) == shiftmap.pair_count(32, 32, k,
                                                                                 "zeros")
    assert soft.pair_count(5, "circular", True, 8, 8) == shiftmap.pair_count(8, 8, 5, "wrap")
    px = soft.sample_pixels(9, "zeros", False, 32, 32, 128)
    assert 0 < soft.pair_count(9, "zeros", False, 32, 32, px) < soft.pair_count(
        9, "zeros", False, 32, 32) / 4
    if "shiftmap" not in _engines():
        assert _search_engine(9, "zeros", False, 32, 32, 1, None, 0) == "xla"
        return
    assert _search_engine(9, "zeros", False, 32, 32, 1, 128, 0) == "xla"
    assert _search_engine(29, "zeros", False, 32, 32, 1, 128, 0) == "auto"
    assert _search_engine(9, "zeros", False, 32, 32, 1, None, 0) == "auto"
