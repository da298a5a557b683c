"""The shared online softmax accumulation (els_jax/softmax.py) against a float64 NumPy softmax."""

import jax.numpy as jnp
import numpy as np

from els_jax.core import softmax


def _reference(logits, values):
    """Softmax-weighted mean over the last axis of logits [Q, M] of values [M, D], float64;
    zero for a query whose candidates are all absent (−inf)."""
    logits = np.asarray(logits, np.float64)
    out = np.zeros((logits.shape[0], values.shape[1]))
    for q, row in enumerate(logits):
        if np.all(np.isneginf(row)):
            continue
        w = np.exp(row - row.max())
        out[q] = (w / w.sum()) @ np.asarray(values, np.float64)
    return out


def _case(seed=0):
    rng = np.random.default_rng(seed)
    # Logit scales far apart per query (as at small t), absent candidates, one query with none.
    logits = rng.normal(size=(5, 24)) * np.array([1.0, 50.0, 400.0, 3.0, 1.0])[:, None]
    logits[0, ::3] = -np.inf
    logits[4] = -np.inf
    values = rng.normal(size=(24, 3))
    return logits.astype(np.float32), values.astype(np.float32)


def test_streamed_chunks_equal_the_one_shot_softmax():
    logits, values = _case()
    state = softmax.init((5,), 3)
    for lo in range(0, 24, 7):                     # uneven chunks
        state = softmax.update(state, jnp.asarray(logits[:, lo:lo + 7]),
                               jnp.asarray(values[lo:lo + 7]))
    got = np.asarray(softmax.finalize(state))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _reference(logits, values), atol=2e-5)


def test_update_with_total_equals_update_and_merge_is_exact():
    logits, values = _case(1)
    ones = np.concatenate([values, np.ones((24, 1), np.float32)], axis=1)
    a, b = softmax.init((5,), 3), softmax.init((5,), 3)
    for lo in range(0, 12, 4):
        a = softmax.update_with_total(a, jnp.asarray(logits[:, lo:lo + 4]),
                                      lambda p, lo=lo: p @ jnp.asarray(ones[lo:lo + 4]))
    for lo in range(12, 24, 4):
        b = softmax.update(b, jnp.asarray(logits[:, lo:lo + 4]), jnp.asarray(values[lo:lo + 4]))
    got = np.asarray(softmax.finalize(softmax.merge(a, b)))
    np.testing.assert_allclose(got, _reference(logits, values), atol=2e-5)
    np.testing.assert_allclose(np.asarray(softmax.log_normalizer(softmax.merge(a, b)))[:4],
                               np.log(np.exp(logits[:4].astype(np.float64)
                                             - logits[:4].max(1, keepdims=True)).sum(1))
                               + logits[:4].max(1), rtol=1e-6)


def test_capped_at_zero_keeps_the_tangent_of_a_logit_rounded_above_the_max():
    """logit − max rounded a few ulps above 0 (XLA may compute the logits twice) is capped at
    0 as a value, and keeps its tangent: that logit is the maximal one, the largest weight. A
    select gave it a zero tangent, a min half of it at a tie."""
    import jax
    d = jnp.array([3e-3, 0.0, -0.5, -jnp.inf], jnp.float32)
    dd = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32)
    value, tangent = jax.jvp(softmax.capped_at_zero, (d,), (dd,))
    np.testing.assert_array_equal(np.asarray(value), [0.0, 0.0, -0.5, -np.inf])
    np.testing.assert_array_equal(np.asarray(tangent), np.asarray(dd))
    # Through the exponentials: the weight of the maximal logit moves with it.
    p, dp = jax.jvp(lambda d: jnp.exp(softmax.capped_at_zero(d)), (d,), (dd,))
    np.testing.assert_allclose(np.asarray(dp), np.asarray(p) * np.asarray(dd), rtol=1e-6)
    assert np.asarray(dp)[0] == 1.0 and np.asarray(dp)[-1] == 0.0
