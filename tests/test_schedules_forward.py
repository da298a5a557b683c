"""Schedules, forward process and the score ↔ ε̂ ↔ x̂_0 conversions (docs/theory.md §1)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from tests import oracles


@pytest.mark.parametrize("name", ["cosine", "cosine_shifted", "linear", "exponential"])
def test_schedule_matches_spec_formula_and_decreases(name):
    t = np.linspace(0.0, 0.99, 57)
    got = np.asarray(ej.schedules.get(name).alpha_bar(jnp.asarray(t)))
    np.testing.assert_allclose(got, oracles.alpha_bar(t, name), rtol=2e-5, atol=2e-7)
    assert np.all(np.diff(got) < 0)


def test_cosine_is_unshifted_paper_schedule():
    s = ej.schedules.cosine()
    assert float(s.alpha_bar(0.0)) == 1.0
    np.testing.assert_allclose(float(s.alpha_bar(1.0)), math.cos(math.pi / 2 / 1.008) ** 2, rtol=1e-3)
    assert 1.5e-4 < float(s.alpha_bar(1.0)) < 1.6e-4


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown schedule"):
        ej.schedules.get("sigmoid")


def test_add_noise_has_the_forward_marginal():
    x0 = jnp.full((20000, 2, 2, 1), 0.7)
    t = 0.4
    xt, eps = ej.add_noise(jax.random.PRNGKey(0), x0, t)
    ab = oracles.alpha_bar(t)
    np.testing.assert_allclose(float(xt.mean()), math.sqrt(ab) * 0.7, atol=0.01)
    np.testing.assert_allclose(float(xt.std()), math.sqrt(1 - ab), atol=0.01)
    np.testing.assert_allclose(np.asarray(xt), math.sqrt(ab) * 0.7 + math.sqrt(1 - ab) * np.asarray(eps), atol=1e-5)


def test_add_noise_accepts_one_time_per_image():
    x0 = jnp.ones((3, 2, 2, 1))
    t = jnp.array([0.0, 0.5, 1.0])
    xt, eps = ej.add_noise(jax.random.PRNGKey(1), x0, t)
    np.testing.assert_allclose(np.asarray(xt[0]), 1.0, atol=1e-6)          # t = 0 is data
    ab = oracles.alpha_bar(0.5)
    np.testing.assert_allclose(np.asarray(xt[1]), math.sqrt(ab) + math.sqrt(1 - ab) * np.asarray(eps[1]), atol=1e-5)


def test_conversions_are_mutually_consistent(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    score = jnp.asarray(rng.normal(size=(2, 3, 3, 1)), jnp.float32)
    t = jnp.array([0.3, 0.8])
    ab = oracles.alpha_bar(np.array([0.3, 0.8]))[:, None, None, None]
    eps = ej.score_to_eps(score, t)
    np.testing.assert_allclose(np.asarray(eps), -np.sqrt(1 - ab) * np.asarray(score), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ej.eps_to_score(eps, t)), np.asarray(score), rtol=1e-5, atol=1e-6)
    x0 = ej.score_to_x0(score, x, t)
    np.testing.assert_allclose(np.asarray(x0), (np.asarray(x) + (1 - ab) * np.asarray(score)) / np.sqrt(ab), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ej.x0_to_score(x0, x, t)), np.asarray(score), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ej.eps_to_x0(eps, x, t)), np.asarray(x0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ej.x0_to_eps(x0, x, t)), np.asarray(eps), rtol=1e-4, atol=1e-5)


def test_conversions_are_finite_at_t_zero():
    x = jnp.ones((1, 2, 2, 1))
    s = ej.x0_to_score(jnp.zeros_like(x), x, 0.0)
    assert np.all(np.isfinite(np.asarray(s)))
