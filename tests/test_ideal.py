"""The ideal score machine against a float64 NumPy oracle, jax.grad, and its invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from tests import oracles


def _data(rng, n=7, h=4, w=3, c=2, b=3):
    images = rng.uniform(-1, 1, size=(n, h, w, c)).astype(np.float32)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(images)


@pytest.mark.parametrize("t", [0.02, 0.5, 0.95])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ideal_score_matches_oracle(rng, t, schedule):
    images = jnp.asarray(rng.uniform(-1, 1, size=(7, 4, 3, 2)).astype(np.float32))
    # Queries on the noisy data manifold (near a·c + b·ε), so the posterior is not one-hot.
    ab = oracles.alpha_bar(t, schedule)
    idx = rng.integers(0, 7, size=3)
    x = jnp.asarray((math.sqrt(ab) * np.asarray(images)[idx]
                     + math.sqrt(1 - ab) * rng.normal(size=(3, 4, 3, 2))).astype(np.float32))
    # chunk_size 3 → 3 chunks with a padded tail: exercises the online log-sum-exp.
    got = ej.ideal_x0(x, t, images, schedule=schedule, chunk_size=3)
    want = oracles.ideal_x0(x, t, images, schedule=schedule)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)
    got_s = ej.ideal_score(x, t, images, schedule=schedule, chunk_size=3)
    want_s = oracles.ideal_score(x, t, images, schedule=schedule)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-3, atol=2e-3 * np.abs(want_s).max())


def test_ideal_score_is_gradient_of_log_mixture_density(rng):
    x, images = _data(rng)
    t = 0.6
    ab = float(ej.schedules.cosine().alpha_bar(t))
    a, b2 = math.sqrt(ab), 1 - ab

    def log_p(xq):  # log (1/N) Σ_n N(xq; a c_n, b² I), up to a constant
        d2 = jnp.sum((xq[None] - a * images) ** 2, axis=(1, 2, 3))
        return jax.scipy.special.logsumexp(-d2 / (2 * b2))

    want = jax.vmap(jax.grad(log_p))(x)
    got = ej.ideal_score(x, t, images, chunk_size=4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-4)


def test_far_apart_queries_are_finite_and_independent(rng):
    _, images = _data(rng)
    x = jnp.stack([jnp.full((4, 3, 2), 300.0), images[2] * 0.99, jnp.full((4, 3, 2), -1e3)])
    for t in [1e-4, 0.5, 1.0]:
        batch = ej.ideal_score(x, t, images, chunk_size=2)
        assert np.all(np.isfinite(np.asarray(batch)))
        one_by_one = jnp.concatenate([ej.ideal_score(x[i:i + 1], t, images, chunk_size=2) for i in range(3)])
        np.testing.assert_allclose(np.asarray(batch), np.asarray(one_by_one), rtol=1e-6)


def test_small_t_returns_the_nearest_training_image(rng):
    x, images = _data(rng, n=9, b=4)
    x0 = ej.ideal_x0(x, 1e-3, images)
    d2 = np.sum((np.asarray(x)[:, None] - np.asarray(images)[None]) ** 2, axis=(2, 3, 4))
    np.testing.assert_allclose(np.asarray(x0), np.asarray(images)[d2.argmin(1)], atol=1e-5)


def test_mask_restricts_candidates_to_selected_images(rng):
    x, images = _data(rng, n=8)
    mask = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)
    t = 0.7
    got = ej.ideal_score(x, t, images, mask=jnp.asarray(mask), chunk_size=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ej.ideal_score(x, t, images[mask])), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), oracles.ideal_score(x, t, images, mask=mask), rtol=1e-3, atol=1e-4)
    # The small-t limit picks the nearest *selected* image.
    x0 = np.asarray(ej.ideal_x0(images[1:2], 1e-3, images, mask=jnp.asarray(mask)))
    assert not np.allclose(x0, np.asarray(images[1:2]), atol=1e-3)


def test_per_example_times_equal_separate_calls(rng):
    x, images = _data(rng)
    t = jnp.array([0.1, 0.5, 0.9])
    batch = ej.ideal_score(x, t, images)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batch[i]), np.asarray(ej.ideal_score(x[i:i + 1], t[i], images))[0], rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear_errors(rng):
    x, images = _data(rng)
    with pytest.raises(ValueError, match="differ in H, W or C"):
        ej.ideal_score(x[:, :3], 0.5, images)
    with pytest.raises(ValueError, match=r"x must be a batch"):
        ej.ideal_score(x[0], 0.5, images)
    with pytest.raises(ValueError, match="selects no training image"):
        ej.ideal_score(x, 0.5, images, mask=jnp.zeros(images.shape[0], bool))
    with pytest.raises(ValueError, match="mask must be"):
        ej.ideal_score(x, 0.5, images, mask=jnp.ones(3, bool))
