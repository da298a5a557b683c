"""docs/theory.md §7.6's smoothed closed-form diffusion model (scfdm) against a float64 NumPy
oracle, its limits (the ideal machine, the mean of the candidates), batch invariance,
determinism, JAX transformations, make_machine and bad inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.core.sampler import sample, uniform_times
from els_jax.machines import scfdm
from els_jax.machines.scfdm import scfdm_score, scfdm_x0
from tests import oracles

KEY = jax.random.PRNGKey(3)
SHAPE = (4, 3, 2)
# One query shape (B = 3), M = 3 and chunk_size = 3 (not dividing N = 7: the last chunk is
# shifted back over rows already seen) wherever a test allows: each compiles once.
KW = dict(key=KEY, num_perturb=3, noise_scale=0.2, chunk_size=3)


def _images(rng, n=7):
    return jnp.asarray(rng.uniform(-1, 1, size=(n,) + SHAPE).astype(np.float32))


def _noisy(rng, images, t, b=3):
    """Queries on the noisy data manifold, a·x_i + b·ε, so posteriors are not one-hot."""
    ab = oracles.alpha_bar(t)
    idx = rng.integers(0, images.shape[0], size=b)
    x = math.sqrt(ab) * np.asarray(images)[idx] + math.sqrt(1 - ab) * rng.normal(
        size=(b,) + images.shape[1:])
    return jnp.asarray(x.astype(np.float32))


def _eps(m=3, key=KEY):
    return np.asarray(scfdm.draw_perturbations(key, m, SHAPE))


def _close(got, want, rtol=2e-4, atol=2e-4):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=atol)


# --- the oracle -------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.01, 0.3, 0.7, 0.99])
@pytest.mark.parametrize("top_k", [None, 3])
def test_matches_oracle(rng, t, top_k):
    images = _images(rng)
    x = _noisy(rng, images, t)
    got = scfdm_x0(x, t, images, top_k=top_k, **KW)
    want = oracles.scfdm_x0(x, t, images, _eps(), 1.0, 0.2, top_k=top_k)
    _close(got, want)
    if top_k is not None and t > 0.5:     # (at small t the posteriors are one-hot)
        assert np.abs(want - oracles.scfdm_x0(x, t, images, _eps(), 1.0, 0.2)).max() > 1e-3
    ab = oracles.alpha_bar(t)
    want_s = -(np.asarray(x, np.float64) - math.sqrt(ab) * want) / (1 - ab)
    _close(scfdm_score(x, t, images, top_k=top_k, **KW), want_s, rtol=1e-3,
           atol=2e-3 * np.abs(want_s).max())


@pytest.mark.parametrize("t,temperature,top_k", [(0.05, 0.5, 3), (0.6, 3.0, None),
                                                 (0.5, 0.4, 4)])
def test_mask_and_temperature_match_oracle(rng, t, temperature, top_k):
    images = _images(rng)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    x = _noisy(rng, images, t)
    got = scfdm_x0(x, t, images, temperature=temperature, top_k=top_k, mask=jnp.asarray(mask),
                   **KW)
    want = oracles.scfdm_x0(x, t, images, _eps(), temperature, 0.2, top_k=top_k, mask=mask)
    _close(got, want)
    # the masked machine is the machine of the selected images
    _close(got, scfdm_x0(x, t, images[mask], temperature=temperature, top_k=top_k, **KW),
           atol=2e-6)
    if t > 0.3:                           # the temperature matters (not one-hot posteriors)
        assert np.abs(want - oracles.scfdm_x0(x, t, images, _eps(), 1.0, 0.2, top_k=top_k,
                                              mask=mask)).max() > 1e-3


# --- limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.02, 0.5, 0.95])
def test_unit_temperature_without_noise_is_the_ideal_machine(rng, t):
    images = _images(rng)
    x = _noisy(rng, images, t)
    mask = jnp.asarray(np.arange(7) % 3 != 0)
    for kw in ({}, {"mask": mask}):
        want = np.asarray(ej.ideal_x0(x, t, images, chunk_size=3, **kw))
        # s = 0: no key needed, the M copies are x itself (computed once)
        got = scfdm_x0(x, t, images, noise_scale=0.0, num_perturb=5, chunk_size=3, **kw)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
        got = scfdm_x0(x, t, images, key=KEY, noise_scale=0.0, chunk_size=3, **kw)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)
        _close(scfdm_score(x, t, images, noise_scale=0.0, chunk_size=3, **kw),
               ej.ideal_score(x, t, images, chunk_size=3, **kw), rtol=1e-5, atol=1e-5)


def test_top_k_of_all_images_is_no_top_k_and_large_temperature_is_the_candidates_mean(rng):
    images = _images(rng)
    x = _noisy(rng, images, 0.4)
    kw = KW
    _close(scfdm_x0(x, 0.4, images, top_k=7, **kw), scfdm_x0(x, 0.4, images, **kw),
           rtol=1e-5, atol=1e-6)
    # τ → ∞: equal weights, the plain mean of the candidates (of the selected ones with a mask)
    mask = np.arange(7) % 2 == 0
    for m, mean in ((None, images.mean(0)), (jnp.asarray(mask), images[mask].mean(0))):
        got = scfdm_x0(x, 0.4, images, temperature=1e7, mask=m, **kw)
        _close(got, jnp.broadcast_to(mean, x.shape), atol=1e-5)
    # ... and with top_k the mean of each copy's k nearest, averaged over the copies
    a = math.sqrt(oracles.alpha_bar(0.4))
    flat = np.asarray(images, np.float64).reshape(7, -1)
    want = []
    for xq in np.asarray(x, np.float64).reshape(3, -1):
        copies = [flat[np.argsort(((xq + 0.2 * e - a * flat) ** 2).sum(1))[:2]].mean(0)
                  for e in _eps(3).reshape(3, -1)]
        want.append(np.mean(copies, axis=0))
    _close(scfdm_x0(x, 0.4, images, temperature=1e7, top_k=2, **kw),
           np.reshape(want, x.shape), atol=1e-5)


def test_top_k_ties_keep_the_earlier_image(rng):
    base = _images(rng, n=3)
    images = jnp.concatenate([base[1:2], base[0:1], base[1:2], base[2:3], base[1:2]])
    x = jnp.asarray(images[0:1])            # nearest: images 0, 2 and 4 (equal distances)
    select = jax.jit(scfdm._top_k_select, static_argnames=("top_k", "chunk_size"))
    for chunk_size in (2, 5):
        vals, idx = select(*_centred(x, 1.0, images), top_k=2, chunk_size=chunk_size)
        np.testing.assert_array_equal(np.asarray(idx), [[0, 2]])
        assert float(vals[0, 0]) == float(vals[0, 1])


def _centred(x, a, images):
    flat, mu, half_sq = scfdm.prepare(images)
    a = jnp.full((x.shape[0], 1), a, jnp.float32)
    return (x.reshape(x.shape[0], -1) - a * mu[None], a, flat, half_sq,
            jnp.zeros((images.shape[0],), jnp.float32))


# --- batches and keys -------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 3])
def test_a_query_does_not_depend_on_its_batch(rng, top_k):
    images = _images(rng)
    x = _noisy(rng, images, 0.5)
    kw = dict(top_k=top_k, **KW)
    batch = np.asarray(scfdm_x0(x, 0.5, images, **kw))
    one = jax.vmap(lambda xq: scfdm_x0(xq[None], 0.5, images, **kw)[0])(x)
    _close(one, batch, rtol=1e-6, atol=1e-6)
    other = x.at[1:].set(jnp.asarray(rng.normal(size=(2,) + SHAPE).astype(np.float32)))
    _close(scfdm_x0(other, 0.5, images, **kw)[0], batch[0], rtol=1e-6, atol=1e-6)
    # one time per query: row i is a call at the scalar t_i
    tv = jnp.array([0.1, 0.6, 0.9])
    per_query = scfdm_x0(x, tv, images, **kw)
    for i in range(3):
        _close(per_query[i], scfdm_x0(x, tv[i], images, **kw)[i], rtol=1e-5, atol=1e-6)


def test_deterministic_in_the_key_and_keys_matter(rng):
    images = _images(rng)
    x = _noisy(rng, images, 0.5)
    kw = {k: v for k, v in KW.items() if k != "key"}
    first = np.asarray(scfdm_x0(x, 0.5, images, key=KEY, **kw))
    np.testing.assert_array_equal(np.asarray(scfdm_x0(x, 0.5, images, key=KEY, **kw)), first)
    np.testing.assert_array_equal(
        np.asarray(scfdm_x0(x, 0.5, images, key=jax.random.PRNGKey(3), **kw)), first)
    other = np.asarray(scfdm_x0(x, 0.5, images, key=jax.random.PRNGKey(4), **kw))
    assert np.abs(other - first).max() > 1e-3
    # new-style typed keys work too
    typed = scfdm_x0(x, 0.5, images, key=jax.random.key(4), **kw)
    assert np.all(np.isfinite(np.asarray(typed)))
    assert scfdm.draw_perturbations(KEY, 5, SHAPE).shape == (5,) + SHAPE


# --- transformations --------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 3])
def test_jit_vmap_grad_jvp_and_finite_differences(rng, top_k):
    images = _images(rng)
    t = 0.5
    x = _noisy(rng, images, t)
    kw = dict(top_k=top_k, **KW)

    def f(xq, tq=t, im=images):
        return scfdm_x0(xq, tq, im, **kw)

    v = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    u = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    if top_k is None:
        # jit ∘ vmap ∘ grad of Σ u·x̂_0 = Jᵀu, images as an argument, over two query batches
        grads = jax.jit(jax.vmap(jax.grad(lambda xq, im: jnp.sum(u * f(xq, im=im))),
                                 in_axes=(0, None)))(jnp.stack([x, x[::-1]]), images)
        _close(grads[1], jax.grad(lambda xq: jnp.sum(u * f(xq)))(x[::-1]), rtol=1e-5,
               atol=1e-6)
    else:                               # (one compile fewer: the transforms compose alike)
        grads = jax.grad(lambda xq: jnp.sum(u * f(xq)))(x)[None]
    assert np.all(np.isfinite(np.asarray(grads)))
    x0, tangent = jax.jvp(f, (x,), (v,))
    _close(x0, f(x), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(tangent)).max() > 1e-2
    # Jv against central differences (small h: the top-k selection must not change)
    h = 1e-2 if top_k is None else 2e-3
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    _close(tangent, fd, rtol=2e-2, atol=2e-2 * np.abs(np.asarray(fd)).max())
    # ⟨u, Jv⟩ = ⟨Jᵀu, v⟩
    np.testing.assert_allclose(float(jnp.sum(u * tangent)), float(jnp.sum(grads[0] * v)),
                               rtol=1e-3)
    # and w.r.t. t (reverse mode without top-k, forward mode with it: one compile each)
    if top_k is None:
        dt = jax.grad(lambda tq: jnp.sum(u * f(x, tq)))(jnp.float32(t))
    else:
        dt = jnp.sum(u * jax.jvp(lambda tq: f(x, tq), (jnp.float32(t),), (jnp.float32(1),))[1])
    ht = 1e-3
    fd_t = jnp.sum(u * (f(x, t + ht) - f(x, t - ht))) / (2 * ht)
    np.testing.assert_allclose(float(dt), float(fd_t), rtol=3e-2, atol=3e-2 * abs(float(fd_t)))


def test_top_k_derivative_is_the_ideal_machines_on_the_selected_images(rng):
    images = _images(rng)
    t = 0.5
    x = _noisy(rng, images, t, b=1)
    v = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    a = math.sqrt(oracles.alpha_bar(t))
    d2 = ((np.asarray(x, np.float64) - a * np.asarray(images, np.float64)) ** 2).sum((1, 2, 3))
    nearest = jnp.asarray(np.isin(np.arange(7), np.argsort(d2)[:3]))
    got = jax.jvp(lambda xq: scfdm_x0(xq, t, images, noise_scale=0.0, top_k=3, chunk_size=3),
                  (x,), (v,))
    want = jax.jvp(lambda xq: ej.ideal_x0(xq, t, images, mask=nearest), (x,), (v,))
    for g, w in zip(got, want):
        _close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [None, 2])
def test_finite_at_small_and_large_t_and_far_from_every_image(rng, top_k):
    images = _images(rng)
    x = jnp.concatenate([_noisy(rng, images, 0.5, b=1), jnp.full((1,) + SHAPE, 1e3),
                         jnp.full((1,) + SHAPE, -1e3)])
    kw = dict(top_k=top_k, **KW)
    for t in (1e-4, 0.999):
        x0 = np.asarray(scfdm_x0(x, t, images, **kw))
        s = np.asarray(scfdm_score(x, t, images, **kw))
        assert np.all(np.isfinite(x0)) and np.all(np.isfinite(s)), t
        assert np.all(np.abs(x0) <= 1.0 + 1e-5)          # averages of training images
        g = jax.grad(lambda xq: jnp.sum(scfdm_x0(xq, t, images, **kw)))(x)
        assert np.all(np.isfinite(np.asarray(g))), t


# --- make_machine -----------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 3])
def test_make_machine_equals_the_functional_machine_and_samples(rng, top_k):
    images = _images(rng)
    mask = np.arange(7) % 4 != 1
    kw = dict(temperature=0.7, num_perturb=3, noise_scale=0.2, top_k=top_k)
    machine = ej.make_machine("scfdm", images, mask=mask, key=KEY, chunk=3, **kw)
    fn = machine._x0_fns[None]
    np.testing.assert_array_equal(np.asarray(fn.eps), _eps(3))     # drawn once, from the key
    times = uniform_times(3)
    for i, t in enumerate(times[:-1]):
        x = _noisy(rng, images, float(t))
        want = scfdm_x0(x, t, images[mask], key=KEY, chunk_size=3, **kw)
        _close(machine.x0(x, t, i), want, rtol=1e-6, atol=1e-6)
        _close(machine(x, t, i), ej.x0_to_eps(want, x, t), rtol=1e-4, atol=1e-4)
        _close(machine.score(x, t, i),
               scfdm_score(x, t, images[mask], key=KEY, chunk_size=3, **kw), rtol=1e-4,
               atol=1e-4)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3,) + SHAPE)
    x0 = np.asarray(sample(machine, x_T, times))
    assert np.all(np.isfinite(x0)) and np.all(np.abs(x0) <= 1.0 + 1e-5)
    # without noise no key is needed
    plain = ej.make_machine("scfdm", images, noise_scale=0.0)
    _close(plain.x0(x_T, 0.5, 0), ej.ideal_x0(x_T, 0.5, images), rtol=0, atol=1e-6)


# --- bad inputs -------------------------------------------------------------------------------

def test_bad_inputs_are_clear_errors(rng):
    images = _images(rng)
    x = _noisy(rng, images, 0.5)
    for fn in (scfdm_x0, scfdm_score):
        with pytest.raises(ValueError, match="differ in H, W or C"):
            fn(x[:, :3], 0.5, images, key=KEY)
        with pytest.raises(ValueError, match="x must be a batch"):
            fn(x[0], 0.5, images, key=KEY)
        with pytest.raises(ValueError, match="mask must be"):
            fn(x, 0.5, images, key=KEY, mask=jnp.ones(3, bool))
        with pytest.raises(ValueError, match="selects no training image"):
            fn(x, 0.5, images, key=KEY, mask=jnp.zeros(7, bool))
        with pytest.raises(ValueError, match="needs key"):
            fn(x, 0.5, images)
    bad = [dict(temperature=0.0), dict(temperature=-1.0), dict(temperature=float("nan")),
           dict(temperature=float("inf")), dict(temperature="1"), dict(num_perturb=0),
           dict(num_perturb=2.0), dict(num_perturb=True), dict(noise_scale=-0.1),
           dict(noise_scale=float("nan")), dict(top_k=0), dict(top_k=8), dict(top_k=2.0),
           dict(key=3)]
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw))):
            scfdm_x0(x, 0.5, images, **{"key": KEY, **kw})
    # top_k counts the images a mask selects
    with pytest.raises(ValueError, match="top_k must lie in"):
        scfdm_x0(x, 0.5, images, key=KEY, top_k=5, mask=jnp.asarray(np.arange(7) < 4))
    for name, value in dict(temperature=1.0, num_perturb=3, noise_scale=0.0, top_k=2,
                            key=KEY).items():
        with pytest.raises(ValueError, match=f"{name} is a parameter of the scfdm machine"):
            ej.make_machine("nearest", images, **{name: value})
    with pytest.raises(ValueError, match="needs key"):
        ej.make_machine("scfdm", images)
    with pytest.raises(ValueError, match="top_k must lie in"):
        ej.make_machine("scfdm", images, key=KEY, top_k=4, mask=np.arange(7) < 3)
    with pytest.raises(ValueError, match="takes no mesh"):
        ej.make_machine("scfdm", images, key=KEY, mesh=ej.candidate_mesh())
