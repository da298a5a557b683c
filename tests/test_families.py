"""docs/theory.md §7's analytic families (gaussian, nearest, pca_locality) against float64 NumPy oracles,
their invariants, their make_machine versions, JAX transformations and bad inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.machines import gaussian, nearest, pca_locality
from tests import oracles


def _images(rng, n=7, h=4, w=3, c=2):
    return jnp.asarray(rng.uniform(-1, 1, size=(n, h, w, c)).astype(np.float32))


def _noisy(rng, images, t, b=3, schedule="cosine"):
    """Queries on the noisy data manifold, a·x_i + b·ε, so posteriors are not one-hot."""
    ab = oracles.alpha_bar(t, schedule)
    idx = rng.integers(0, images.shape[0], size=b)
    x = math.sqrt(ab) * np.asarray(images)[idx] + math.sqrt(1 - ab) * rng.normal(
        size=(b,) + images.shape[1:])
    return jnp.asarray(x.astype(np.float32))


def _gap_tau(t, images, mask=None, lo=0.3, hi=0.8):
    """A τ in the widest gap of the sorted |M̃|/max|M̃| between quantiles lo and hi, so that
    float32 rounding cannot flip a mask entry and the mask is neither full nor empty."""
    m_tilde, _ = oracles.pca_locality_mask(t, images, 0.0, mask)
    v = np.sort(np.abs(m_tilde).ravel()) / np.abs(m_tilde).max()
    sel = v[int(lo * v.size):int(hi * v.size)]
    j = int(np.argmax(np.diff(sel)))
    assert sel[j + 1] - sel[j] > 2e-5, "no safe gap for tau in this data"
    return float(sel[j] + sel[j + 1]) / 2


def _close(got, want, rtol=1e-4, atol=1e-4):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


# --- gaussian ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.01, 0.3, 0.7, 0.99])
@pytest.mark.parametrize("shape", [(7, 4, 3, 2), (40, 2, 2, 2)], ids=["N<D", "N>D"])
def test_gaussian_matches_oracle(rng, t, shape):
    images = _images(rng, *shape)
    x = _noisy(rng, images, t)
    _close(ej.gaussian_x0(x, t, images), oracles.gaussian_x0(x, t, images), atol=2e-5)
    want_s = oracles.gaussian_x0(x, t, images)
    ab = oracles.alpha_bar(t)
    want_s = -(np.asarray(x, np.float64) - math.sqrt(ab) * want_s) / (1 - ab)
    _close(ej.gaussian_score(x, t, images), want_s, rtol=1e-3, atol=1e-3 * np.abs(want_s).max())


@pytest.mark.parametrize("shape", [(7, 4, 3, 2), (40, 2, 2, 2)], ids=["N<D", "N>D"])
@pytest.mark.parametrize("t", [0.02, 0.6])
def test_gaussian_rank_and_mask_match_oracle(rng, shape, t):
    images = _images(rng, *shape)
    mask = np.zeros(shape[0], bool)
    mask[::2] = True
    x = _noisy(rng, images, t)
    _close(ej.gaussian_x0(x, t, images, rank=3), oracles.gaussian_x0(x, t, images, rank=3),
           atol=2e-5)
    _close(ej.gaussian_x0(x, t, images, mask=jnp.asarray(mask)),
           oracles.gaussian_x0(x, t, images, mask=mask), atol=2e-5)
    _close(ej.gaussian_x0(x, t, images, rank=2, mask=jnp.asarray(mask)),
           oracles.gaussian_x0(x, t, images, rank=2, mask=mask), atol=2e-5)
    # The full rank is no rank; the masked machine is the machine of the selected images.
    _close(ej.gaussian_x0(x, t, images, rank=int(np.prod(shape[1:]))),
           ej.gaussian_x0(x, t, images), atol=1e-6)
    _close(ej.gaussian_x0(x, t, images, mask=jnp.asarray(mask)),
           ej.gaussian_x0(x, t, images[mask]), atol=1e-5)


def test_gaussian_fit_streamed_qr_equals_the_direct_svd(rng):
    flat = jnp.asarray(rng.normal(size=(300, 6)) * np.array([3, 2, 1, 0.5, 0.1, 0.0]),
                       jnp.float32)
    w = jnp.asarray(rng.uniform(0, 1, size=300) * (np.arange(300) % 5 != 0), jnp.float32)
    w = w / jnp.sum(w)
    direct = gaussian.fit_flat(flat, w)
    # 64 rows per QR step: 5 steps, the last one shifted back over rows already seen.
    streamed = gaussian.fit_flat(flat, w, direct_max=0, qr_rows=64)
    mu = np.asarray(w, np.float64) @ np.asarray(flat, np.float64)
    cov = ((np.asarray(flat, np.float64) - mu).T * np.asarray(w, np.float64)) @ (
        np.asarray(flat, np.float64) - mu)
    # The streamed fit is a loop of jitted steps: it must also trace under an outer jit.
    jitted = jax.jit(lambda f, w: gaussian.fit_flat(f, w, direct_max=0, qr_rows=64))(flat, w)
    for fit in (direct, streamed, jitted):
        _close(fit.mean, mu, atol=1e-6)
        _close(fit.eigvals, np.linalg.eigvalsh(cov)[::-1], rtol=1e-5, atol=1e-6)
        assert float(fit.eigvals[-1]) == 0.0            # the constant column: exactly none
        u = np.asarray(fit.eigvecs, np.float64)
        _close((u * np.asarray(fit.eigvals)) @ u.T, cov, atol=2e-5)


def test_gaussian_rank_output_lies_in_the_top_components(rng):
    images = _images(rng)
    x = _noisy(rng, images, 0.4)
    mu, cov = oracles.gaussian_moments(images)
    lam, u = np.linalg.eigh(cov)
    top = u[:, np.argsort(lam)[::-1][:4]]
    dev = np.asarray(ej.gaussian_x0(x, 0.4, images, rank=4), np.float64).reshape(3, -1) - mu
    assert np.linalg.norm(dev) > 0.1
    _close(dev, dev @ top @ top.T, atol=1e-5)          # no part outside span(top 4)
    # and the full machine has a part outside it
    full = np.asarray(ej.gaussian_x0(x, 0.4, images), np.float64).reshape(3, -1) - mu
    assert np.abs(full - full @ top @ top.T).max() > 1e-2


def test_gaussian_score_is_gradient_of_the_gaussian_log_density(rng):
    images = _images(rng, n=30, h=2, w=2, c=2)
    t = 0.5
    x = _noisy(rng, images, t)
    a = math.sqrt(oracles.alpha_bar(t))
    mu, cov = oracles.gaussian_moments(images)
    prec = jnp.asarray(np.linalg.inv(a * a * cov + (1 - a * a) * np.eye(8)), jnp.float32)
    mu = jnp.asarray(mu, jnp.float32)

    def log_p(xq):      # log N(xq; aμ, a²Σ + b²I) up to a constant
        d = xq.reshape(-1) - a * mu
        return -0.5 * d @ prec @ d

    _close(ej.gaussian_score(x, t, images), jax.vmap(jax.grad(log_p))(x), rtol=1e-4, atol=1e-4)


def test_gaussian_of_one_image_returns_it(rng):
    images = _images(rng, n=1)
    x = jnp.concatenate([_noisy(rng, images, 0.5, b=2), jnp.full((1, 4, 3, 2), 300.0)])
    for t in [0.0, 0.001, 0.3, 0.9, 1.0]:
        _close(ej.gaussian_x0(x, t, images), jnp.broadcast_to(images, x.shape), atol=1e-6)
    # and the machine of a class with one image samples it
    others = _images(rng, n=3)
    machine = ej.make_machine("gaussian", jnp.concatenate([others[:2], images, others[2:]]),
                              mask=np.array([0, 0, 1, 0], bool))
    x0 = ej.sample(machine, jax.random.normal(jax.random.PRNGKey(1), x.shape),
                   ej.uniform_times(4))
    _close(x0, jnp.broadcast_to(images, x.shape), atol=1e-5)


def test_gaussian_small_t_keeps_a_training_image_and_projects_onto_the_data(rng):
    images = _images(rng)
    t = 1e-3
    a = math.sqrt(oracles.alpha_bar(t))
    _close(ej.gaussian_x0(a * images, t, images), images, atol=1e-3)
    # a direction orthogonal to the data's affine hull is removed: x̂_0 is the projection
    mu, cov = oracles.gaussian_moments(images)
    lam, u = np.linalg.eigh(cov)
    null = u[:, lam < 1e-9 * lam.max()][:, 0]
    x = a * np.asarray(images[:1], np.float64) + 0.5 * null.reshape(1, 4, 3, 2)
    _close(ej.gaussian_x0(jnp.asarray(x, jnp.float32), t, images), images[:1], atol=1e-3)


# --- nearest ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.01, 0.5, 0.99])
def test_nearest_matches_oracle(rng, t):
    images = _images(rng)
    x = _noisy(rng, images, t)
    mask = np.array([1, 0, 1, 1, 0, 0, 1], bool)
    np.testing.assert_array_equal(np.asarray(ej.nearest_x0(x, t, images, chunk_size=3)),
                                  oracles.nearest_x0(x, t, images).astype(np.float32))
    got = ej.nearest_x0(x, t, images, mask=jnp.asarray(mask), chunk_size=3)
    np.testing.assert_array_equal(np.asarray(got),
                                  oracles.nearest_x0(x, t, images, mask=mask).astype(np.float32))
    idx = nearest.nearest_index(x, t, images, mask=jnp.asarray(mask))
    assert np.all(mask[np.asarray(idx)])


@pytest.mark.parametrize("t", [0.3, 0.8])
def test_nearest_is_the_small_t_limit_of_the_ideal_machine(rng, t):
    images = _images(rng)
    x = _noisy(rng, images, t)
    a = math.sqrt(oracles.alpha_bar(t))
    # argmin ‖x − a·x_i‖² = argmin ‖x/a − x_i‖²: the ideal machine of x/a as t → 0.
    _close(ej.nearest_x0(x, t, images), ej.ideal_x0(x / a, 1e-3, images), atol=1e-5)
    # Its score has Jacobian −I/b² (x̂_0 is piecewise constant).
    v = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    s, ds = jax.jvp(lambda xq: ej.nearest_score(xq, t, images), (x,), (v,))
    _close(ds, -v / (1 - a * a), rtol=1e-5, atol=1e-5)
    _close(s, -(x - a * ej.nearest_x0(x, t, images)) / (1 - a * a), rtol=1e-5, atol=1e-5)


# --- pca_locality -----------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.01, 0.5, 0.99])
@pytest.mark.parametrize("shape", [(7, 4, 3, 2), (30, 2, 2, 2)], ids=["N<D", "N>D"])
def test_pca_locality_mask_matches_oracle(rng, t, shape):
    images = _images(rng, *shape)
    tau = _gap_tau(t, images)
    want = oracles.pca_locality_mask(t, images, tau)[1]
    got = np.asarray(pca_locality.pca_locality_mask(t, images, tau=tau))
    assert 0.1 < want.mean() < 0.9                    # a non-trivial mask
    np.testing.assert_array_equal(got, want)
    assert np.all(np.asarray(pca_locality.pca_locality_mask(t, images, tau=0.0)))


@pytest.mark.parametrize("t", [0.01, 0.3, 0.7, 0.99])
def test_pca_locality_matches_oracle(rng, t):
    images = _images(rng, n=7)
    tau = _gap_tau(t, images)
    x = _noisy(rng, images, t)
    # chunk_size 3: 3 chunks, the last one shifted back over already seen images.
    got = ej.pca_locality_x0(x, t, images, tau=tau, chunk_size=3)
    want = oracles.pca_locality_x0(x, t, images, tau)
    _close(got, want, rtol=2e-4, atol=2e-4)
    if t > 0.1:                         # (at t = 0.01 both posteriors are one-hot)
        assert np.abs(want - oracles.ideal_x0(x, t, images)).max() > 1e-2   # τ matters
    ab = oracles.alpha_bar(t)
    want_s = -(np.asarray(x, np.float64) - math.sqrt(ab) * want) / (1 - ab)
    _close(ej.pca_locality_score(x, t, images, tau=tau, chunk_size=3), want_s, rtol=1e-3,
           atol=2e-3 * np.abs(want_s).max())


@pytest.mark.parametrize("t", [0.05, 0.6])
def test_pca_locality_with_mask_matches_oracle(rng, t):
    images = _images(rng, n=10, h=3, w=3, c=1)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], bool)
    tau = _gap_tau(t, images, mask)
    x = _noisy(rng, images, t)
    got = ej.pca_locality_x0(x, t, images, tau=tau, mask=jnp.asarray(mask), chunk_size=4)
    _close(got, oracles.pca_locality_x0(x, t, images, tau, mask=mask), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("t", [0.02, 0.5, 0.95])
def test_pca_locality_with_tau_zero_is_the_ideal_machine(rng, t):
    images = _images(rng)
    x = _noisy(rng, images, t)
    mask = jnp.asarray(np.arange(7) % 3 != 0)
    _close(ej.pca_locality_x0(x, t, images, tau=0.0, chunk_size=3), ej.ideal_x0(x, t, images),
           atol=2e-5)
    _close(ej.pca_locality_x0(x, t, images, tau=0.0, mask=mask),
           ej.ideal_x0(x, t, images, mask=mask), atol=2e-5)


def test_pca_locality_output_pixel_ignores_inputs_outside_its_mask(rng):
    images = _images(rng, n=7)
    t = 0.5
    tau = _gap_tau(t, images)
    m = np.asarray(pca_locality.pca_locality_mask(t, images, tau=tau))     # [n, m]
    x = _noisy(rng, images, t, b=1)
    base = np.asarray(ej.pca_locality_x0(x, t, images, tau=tau)).reshape(-1)
    changed = 0
    for px in [0, 5, 11, 23]:
        outside = ~m[:, px]
        assert outside.any()
        bump = np.where(outside, 3.0, 0.0).reshape(x.shape).astype(np.float32)
        out = np.asarray(ej.pca_locality_x0(x + bump, t, images, tau=tau)).reshape(-1)
        assert out[px] == base[px]                        # exactly: those inputs have weight 0
        changed += np.abs(out - base).max() > 1e-3        # ... while other pixels see them
    assert changed > 0


def _near_constant_border(rng, n=60, inner=3, pad=2):
    """Digit-like images: an inner×inner block of real variation inside a border of pixels
    near −1 (variance ~5e-8) that weakly copy the nearest inner pixel (3e-4 of it, plus noise),
    as MNIST's borders after resizing 28×28 to 32×32."""
    core = rng.uniform(-1, 1, (n, inner, inner))
    near = np.pad(core, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    imgs = -1.0 + 3e-4 * (near + 1) + 1.3e-4 * rng.standard_normal(near.shape)
    imgs[:, pad:pad + inner, pad:pad + inner] = core
    return jnp.asarray(imgs[..., None].astype(np.float32))


@pytest.mark.parametrize("t", [0.05, 0.2, 0.6])
def test_pca_locality_relative_floor_keeps_masks_on_near_constant_pixels(rng, t):
    """docs/theory.md §7.3: with the relative floor no mask is empty on near-constant pixels;
    every mask holds its own output pixel (max|M̃| ≤ 31.6 < 1/τ); the masks are the oracle's;
    τ = 0 is still IS. At t = 0.05 the studio's absolute 1e-6 floor empties most of them."""
    images = _near_constant_border(rng)
    d = int(np.prod(images.shape[1:]))
    assert float(np.var(np.asarray(images)[:, 0], axis=0).max()) < 1e-7
    for tau in (0.02, 0.005):
        got = np.asarray(pca_locality.pca_locality_mask(t, images, tau=tau))      # [n, m]
        np.testing.assert_array_equal(got, oracles.pca_locality_mask(t, images, tau)[1])
        assert np.all(np.diag(got)), "an output pixel missing from its own mask"
        assert got.sum() < d * d
        np.testing.assert_array_equal(pca_locality.mask_sizes(got.T), got.sum(axis=0))
    if t == 0.05:   # the absolute floor, by hand in float64: border rows of M̃ reach ~10²
        a, b2 = math.sqrt(oracles.alpha_bar(t)), 1 - oracles.alpha_bar(t)
        _, cov = oracles.gaussian_moments(images)
        w = np.linalg.solve(a * a * cov + b2 * np.eye(d), a * a * cov).T
        diag = np.diag(w).copy()
        diag[np.abs(diag) < 1e-6] = 1.0
        mag = np.abs(w / diag[:, None])
        assert mag.max() > 100
        assert ((mag >= 0.02 * mag.max()).sum(axis=0) == 0).mean() > 0.5
    x = _noisy(rng, images, t)
    _close(ej.pca_locality_x0(x, t, images, tau=0.0, chunk_size=7), ej.ideal_x0(x, t, images),
           rtol=1e-4, atol=1e-4)
    _close(ej.pca_locality_x0(x, t, images, tau=0.02, chunk_size=7),
           oracles.pca_locality_x0(x, t, images, 0.02), rtol=2e-4, atol=2e-4)


def test_pca_locality_is_one_global_softmax_whatever_the_chunking(rng):
    images = _images(rng)
    t = 0.4
    tau = _gap_tau(t, images)
    x = _noisy(rng, images, t)
    outs = [np.asarray(ej.pca_locality_x0(x, t, images, tau=tau, chunk_size=k))
            for k in (3, 1, 7)]
    for out in outs[1:]:
        _close(out, outs[0], rtol=1e-5, atol=1e-6)
    # Averaging per-chunk softmaxes (analytic-diffusion-studio, chunks of 4 and 3) differs.
    a, b2 = math.sqrt(oracles.alpha_bar(t)), 1 - oracles.alpha_bar(t)
    m = oracles.pca_locality_mask(t, images, tau)[1]
    flat = np.asarray(images, np.float64).reshape(7, -1)
    xf = np.asarray(x, np.float64).reshape(3, -1)
    per_chunk = []
    for s in (slice(0, 4), slice(4, 7)):
        d2 = (xf[:, None] - a * flat[None, s]) ** 2                    # [B, M, D]
        logits = -np.einsum("bin,nm->bim", d2, m) / (2 * b2)
        w = np.exp(logits - logits.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        per_chunk.append(np.einsum("bim,im->bm", w, flat[s]))
    buggy = np.mean(per_chunk, axis=0).reshape(x.shape)
    assert np.abs(buggy - outs[0]).max() > 1e-2


# --- all families ---------------------------------------------------------------------------

FUNCTIONAL = {
    "gaussian": lambda x, t, im, **kw: ej.gaussian_x0(x, t, im, rank=5, **kw),
    "nearest": lambda x, t, im, **kw: ej.nearest_x0(x, t, im, chunk_size=3, **kw),
    "pca_locality": lambda x, t, im, **kw: ej.pca_locality_x0(x, t, im, tau=0.1,
                                                              chunk_size=3, **kw),
}
SCORES = {
    "gaussian": lambda x, t, im, **kw: ej.gaussian_score(x, t, im, rank=5, **kw),
    "nearest": lambda x, t, im, **kw: ej.nearest_score(x, t, im, chunk_size=3, **kw),
    "pca_locality": lambda x, t, im, **kw: ej.pca_locality_score(x, t, im, tau=0.1,
                                                                 chunk_size=3, **kw),
}
MACHINE_KW = {"gaussian": {"rank": 5}, "nearest": {"chunk": 3},
              "pca_locality": {"tau": 0.1, "chunk": 3}}


@pytest.mark.parametrize("kind", list(FUNCTIONAL))
def test_per_example_times_equal_separate_calls(rng, kind):
    images = _images(rng)
    x = _noisy(rng, images, 0.5)
    t = jnp.array([0.1, 0.5, 0.9])
    batch = FUNCTIONAL[kind](x, t, images)
    for i in range(3):          # (queries are independent: row i of a call at the scalar t_i)
        _close(batch[i], FUNCTIONAL[kind](x, t[i], images)[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(FUNCTIONAL))
def test_make_machine_equals_the_functional_machine(rng, kind):
    images = _images(rng)
    mask = np.arange(7) % 4 != 1
    machine = ej.make_machine(kind, images, mask=mask, **MACHINE_KW[kind])
    times = ej.uniform_times(4)
    for i, t in enumerate(times[:-1]):
        x = _noisy(rng, images, float(t))
        want = FUNCTIONAL[kind](x, t, images[mask])
        _close(machine.x0(x, t, i), want, rtol=1e-5, atol=1e-5)
        _close(machine(x, t, i), ej.x0_to_eps(want, x, t), rtol=1e-4, atol=1e-4)
        _close(machine.score(x, t, i), SCORES[kind](x, t, images[mask]), rtol=1e-4, atol=1e-4)
    if kind == "pca_locality":
        fn = machine._x0_fns[None]
        assert len(fn.masks) == 4                      # one mask per grid time, kept
        x = _noisy(rng, images, 0.5)
        np.testing.assert_array_equal(np.asarray(machine.x0(x, times[1], 1)),
                                      np.asarray(machine.x0(x, times[1], 1)))
        assert len(fn.masks) == 4
        # one time per query computes its masks in the call
        tv = jnp.array([0.2, 0.5, 0.7])
        _close(machine.x0(x, tv, 0), FUNCTIONAL[kind](x, tv, images[mask]), rtol=1e-5,
               atol=1e-5)
    # The last DDIM step lands on x̂_0: the nearest machine samples a (selected) training image.
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 3, 2))
    x0 = np.asarray(ej.sample(machine, x_T, times))
    assert np.all(np.isfinite(x0))
    if kind == "nearest":
        d = np.abs(x0[:, None] - np.asarray(images)[mask][None]).max(axis=(2, 3, 4))
        assert np.all(d.min(axis=1) < 1e-5)


@pytest.mark.parametrize("kind", list(FUNCTIONAL))
def test_jit_vmap_grad_and_jvp(rng, kind):
    images = _images(rng)
    t = 0.4
    x = _noisy(rng, images, t)
    x0_fn = FUNCTIONAL[kind]
    v = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    # jit ∘ vmap ∘ grad of Σ v·x̂_0(x) = Jᵀv (J the Jacobian of x̂_0), images as an argument,
    # mapped over two query batches.
    grads = jax.jit(jax.vmap(jax.grad(lambda xq, im: jnp.sum(v * x0_fn(xq, t, im))),
                             in_axes=(0, None)))(jnp.stack([x, x[::-1]]), images)
    assert np.all(np.isfinite(np.asarray(grads)))
    x0, tangent = jax.jvp(lambda xq: x0_fn(xq, t, images), (x,), (v,))
    _close(x0, x0_fn(x, t, images), rtol=1e-6, atol=1e-6)
    if kind == "gaussian":          # x̂_0 is affine in x with a symmetric linear part
        _close(tangent, x0_fn(x + v, t, images) - x0, rtol=1e-4, atol=1e-5)
        _close(grads[0], tangent, rtol=1e-4, atol=1e-5)
    elif kind == "nearest":         # piecewise constant
        np.testing.assert_array_equal(np.asarray(grads), 0.0)
        np.testing.assert_array_equal(np.asarray(tangent), 0.0)
    else:                           # J from the oracle's softmax covariances
        assert 0.1 < np.mean(oracles.pca_locality_mask(t, images, 0.1)[1]) < 0.95  # local
        for bi in range(3):
            jac = oracles.pca_locality_jacobian(x[bi], t, images, 0.1)
            vb = np.asarray(v[bi], np.float64).reshape(-1)
            _close(np.asarray(tangent[bi]).reshape(-1), jac @ vb, rtol=1e-3,
                   atol=1e-3 * np.abs(jac @ vb).max())
            _close(np.asarray(grads[0, bi]).reshape(-1), vb @ jac, rtol=1e-3,
                   atol=1e-3 * np.abs(vb @ jac).max())
        assert np.abs(np.asarray(grads)).max() > 0.1
    # the second mapped batch holds the same queries reversed (v is not): its own gradient
    assert not np.allclose(np.asarray(grads[1]), np.asarray(grads[0][::-1])) or kind == "nearest"


@pytest.mark.parametrize("kind", list(FUNCTIONAL))
def test_finite_at_t0_t1_and_far_from_every_image(rng, kind):
    images = _images(rng)
    x = jnp.concatenate([_noisy(rng, images, 0.5, b=1), jnp.full((1, 4, 3, 2), 300.0),
                         jnp.full((1, 4, 3, 2), -1e3)])
    for schedule, t in [("cosine", 0.0), ("cosine", 1.0), ("cosine_shifted", 1.0)]:
        x0 = np.asarray(FUNCTIONAL[kind](x, t, images, schedule=schedule))
        s = np.asarray(SCORES[kind](x, t, images, schedule=schedule))
        assert np.all(np.isfinite(x0)) and np.all(np.isfinite(s)), (schedule, t)
        if kind != "gaussian":          # convex combinations of training images
            assert np.all(np.abs(x0) <= 1.0 + 1e-5)
        # nothing is shared across the batch: permuting the queries permutes the answers
        perm = np.asarray(FUNCTIONAL[kind](x[::-1], t, images, schedule=schedule))
        _close(perm[::-1], x0, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors(rng):
    images = _images(rng)
    x = _noisy(rng, images, 0.5)
    for fn in (ej.gaussian_x0, ej.nearest_x0, ej.pca_locality_x0, ej.gaussian_score,
               ej.nearest_score, ej.pca_locality_score):
        with pytest.raises(ValueError, match="differ in H, W or C"):
            fn(x[:, :3], 0.5, images)
        with pytest.raises(ValueError, match="x must be a batch"):
            fn(x[0], 0.5, images)
        with pytest.raises(ValueError, match="images must be"):
            fn(x, 0.5, images[0])
        with pytest.raises(ValueError, match="mask must be"):
            fn(x, 0.5, images, mask=jnp.ones(3, bool))
        with pytest.raises(ValueError, match="selects no training image"):
            fn(x, 0.5, images, mask=jnp.zeros(7, bool))
    for rank in (0, 25, 2.5, True, -1):
        with pytest.raises(ValueError, match="rank"):
            ej.gaussian_x0(x, 0.5, images, rank=rank)
    for tau in (-0.1, 1.5, float("nan"), "0.1", None):
        with pytest.raises(ValueError, match="tau"):
            ej.pca_locality_x0(x, 0.5, images, tau=tau)
    with pytest.raises(ValueError, match="one scalar time"):
        pca_locality.pca_locality_mask(jnp.array([0.1, 0.2]), images)
    with pytest.raises(ValueError, match="rank is a parameter of the gaussian"):
        ej.make_machine("pca_locality", images, rank=3)
    with pytest.raises(ValueError, match="tau is a parameter of the pca_locality"):
        ej.make_machine("ideal", images, tau=0.1)
    with pytest.raises(ValueError, match="takes no mesh"):
        ej.make_machine("nearest", images, mesh=ej.candidate_mesh())
    with pytest.raises(ValueError, match="rank must lie"):
        ej.make_machine("gaussian", images, rank=100)
    with pytest.raises(ValueError, match="tau must lie"):
        ej.make_machine("pca_locality", images, tau=-1.0)
    with pytest.raises(ValueError, match="selects no training image"):
        ej.make_machine("gaussian", images, mask=np.zeros(7, bool))


def test_image_stats_read_a_chunk_at_a_time_equal_float64():
    """μ and ½‖x_i − μ‖² of uint8 and float images, streamed in chunks (the last one shifted
    back over rows already seen), against float64 NumPy."""
    from els_jax.machines import ideal
    rng = np.random.default_rng(5)
    pix = rng.integers(0, 256, (23, 3, 2, 2), dtype=np.uint8)
    values = ej.core.data.UINT8_TO_UNIT[pix].reshape(23, -1).astype(np.float64)
    mu = values.mean(0)
    half_sq = 0.5 * ((values - mu) ** 2).sum(1)
    for images in (pix, values.reshape(pix.shape).astype(np.float32)):
        for chunk in (5, 23, 64):
            got_mu, got_hs = ideal.image_stats(jnp.asarray(images), chunk_size=chunk)
            _close(got_mu, mu, rtol=1e-6, atol=1e-6)
            _close(got_hs, half_sq, rtol=1e-5, atol=1e-6)


def test_families_stream_uint8_images_without_a_float_copy():
    """docs/theory.md §9.2 for the families: the ideal, nearest and scfdm streams, PCA-locality
    and the streamed Gaussian fit (its mean and each QR step) read uint8 images a chunk at a
    time. Their compiled programs
    hold no float32 copy of the set (XLA's temporaries stay under a quarter of its bytes) and
    give the float32 set's values."""
    from els_jax.machines import ideal, scfdm
    rng = np.random.default_rng(6)
    n, shape = 8192, (8, 8, 3)
    pix = jnp.asarray(rng.integers(0, 256, (n,) + shape, dtype=np.uint8))
    as_float = jnp.asarray(ej.core.data.unit_images(np.asarray(pix)))
    copy_bytes = n * math.prod(shape) * 4
    x = jnp.asarray(0.7 * np.asarray(as_float[:2]) + 0.3 * rng.normal(size=(2,) + shape),
                    jnp.float32)
    a, b2 = jnp.full((2,), 0.7, jnp.float32), jnp.full((2,), 0.51, jnp.float32)
    log_w = jnp.zeros((n,), jnp.float32)
    w = jnp.full((n,), 1.0 / n, jnp.float32)
    fit = gaussian.fit_flat(as_float, w, direct_max=0, qr_rows=2048)
    fit_r = jnp.zeros((math.prod(shape),) * 2, jnp.float32)
    np.testing.assert_allclose(np.asarray(gaussian.fit_flat(pix, w, direct_max=0,
                                                            qr_rows=2048).eigvals),
                               np.asarray(fit.eigvals), rtol=1e-5, atol=1e-5)
    zero_eps = jnp.zeros((2,) + shape)

    def stream_args(src):
        return (x, a, b2, src, *ideal.image_stats(src, chunk_size=256), log_w)

    # name → (jitted function, its arguments for a set of images, its static keywords)
    calls = {
        "ideal": (ideal.ideal_prepared_x0, stream_args, dict(chunk_size=128)),
        "nearest": (nearest.nearest_prepared_x0, stream_args, dict(chunk_size=128)),
        "scfdm": (scfdm.scfdm_x0_at, lambda src: (x, a, b2, zero_eps) + stream_args(src)[3:],
                  dict(temperature=jnp.float32(1.0), noise_scale=jnp.float32(0.1), top_k=None,
                       chunk_size=128)),
        "stats": (ideal.image_stats, lambda src: (src,), dict(chunk_size=256)),
        "fit mean": (gaussian._weighted_mean, lambda src: (src, w), dict(rows=256)),
        "fit step": (gaussian._qr_step, lambda src: (fit_r, src, fit.mean, jnp.sqrt(w),
                                                     jnp.int32(256), jnp.int32(0)),
                     dict(rows=256)),
        "pca ranges": (pca_locality._pixel_ranges, lambda src: (src, log_w),
                       dict(chunk_size=256)),
        "pca": (pca_locality.fit_x0,
                lambda src: (x, a, b2, fit, pca_locality.prepare(src, log_w), jnp.float32(0.05)),
                dict(chunk_size=64, shared=True)),
    }
    for name, (fn, args, kw) in calls.items():
        temp = fn.lower(*args(pix), **kw).compile().memory_analysis().temp_size_in_bytes
        assert temp < copy_bytes / 4, (name, temp, copy_bytes)
        for u, f in zip(jax.tree_util.tree_leaves(fn(*args(pix), **kw)),
                        jax.tree_util.tree_leaves(fn(*args(as_float), **kw))):
            np.testing.assert_allclose(np.asarray(u), np.asarray(f), rtol=1e-5, atol=1e-5,
                                       err_msg=name)


def test_gaussian_and_pca_machines_share_one_fit_of_the_same_images(rng, monkeypatch):
    """One Gaussian fit per content (``families.gaussian_fit``): the gaussian and pca_locality
    machines of the same images fit once; other images fit again."""
    from els_jax.machines import bank_cache, families
    bank_cache.clear_bank_cache()
    fits = []
    fit = gaussian.fit_gaussian
    monkeypatch.setattr(gaussian, "fit_gaussian", lambda *a, **k: fits.append(1) or fit(*a, **k))
    images = _images(rng)
    x = _noisy(rng, images, 0.4)
    g = ej.make_machine("gaussian", images)
    p = ej.make_machine("pca_locality", images, tau=0.0)
    assert len(fits) == 1
    _close(g.x0(x, jnp.float32(0.4), 0), ej.gaussian_x0(x, 0.4, images), atol=1e-5)
    _close(p.x0(x, jnp.float32(0.4), 0), ej.ideal_x0(x, 0.4, images), atol=1e-5)   # τ = 0
    before = len(fits)                                   # (gaussian_x0 fits on its own)
    families.gaussian_fit(images)
    assert len(fits) == before
    families.gaussian_fit(images + 0.5 * (images < 0))
    assert len(fits) == before + 1
    bank_cache.clear_bank_cache()
