"""The one softmax accumulation every analytic machine uses (docs/theory.md §2).

Every machine computes, for each query r (an image, or one pixel of one image),

    x̂_0[r] = Σ_c w[r, c] · v[c],      w[r, :] = softmax_c(logit[r, c]),

over ALL candidates c. The candidates are streamed in chunks; an online log-sum-exp keeps a
running maximum per query, so memory does not grow with the number of candidates and the
max-subtraction is never shared between queries. Absent candidates (padding of the last
chunk, images excluded by a class mask) carry logit -inf and contribute exactly zero.

    state = init((Q,), D)
    for logits, values in chunks:            # logits [Q, M], values [M, D] or [Q, M, D]
        state = update(state, logits, values)
    mean = finalize(state)                   # [Q, D]

``merge`` combines two partial states (e.g. from two devices holding different candidates).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["SoftmaxState", "init", "update", "update_with", "update_with_total", "merge",
           "merge_across", "sharded", "chunk_starts", "finalize", "log_normalizer",
           "capped_at_zero"]


class SoftmaxState(NamedTuple):
    """Running accumulators, for queries of shape ``batch``.

    max:   [*batch]     running maximum logit m (−inf before any candidate).
    total: [*batch]     Σ_c exp(logit_c − m).
    acc:   [*batch, D]  Σ_c exp(logit_c − m) · v_c.
    """

    max: jax.Array
    total: jax.Array
    acc: jax.Array


def init(batch_shape, value_dim: int, dtype=jnp.float32) -> SoftmaxState:
    batch_shape = tuple(batch_shape)
    return SoftmaxState(
        max=jnp.full(batch_shape, -jnp.inf, dtype),
        total=jnp.zeros(batch_shape, dtype),
        acc=jnp.zeros(batch_shape + (value_dim,), dtype),
    )


def _finite_or_zero(m):
    # A query that has seen only absent candidates has max = −inf; using 0 as its reference
    # makes exp(−inf − 0) = 0 instead of exp(−inf + inf) = NaN.
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _exponentials(state: SoftmaxState, logits):
    """The new running max, the factor rescaling the old sums to it, and exp(logit − max)."""
    # The running max is a reference point only: exp(logit − max)·exp(max) does not depend on
    # it, so it is held constant under differentiation (exact). Differentiating the max would
    # divide by the count of logits equal to it, and under jit XLA may compute the logits
    # once for the max and again for that comparison, rounded differently: a count of 0 and
    # NaN tangents (seen in the shift-map jnp form).
    new_max = jax.lax.stop_gradient(jnp.maximum(state.max, jnp.max(logits, axis=-1)))
    ref = _finite_or_zero(new_max)
    return new_max, jnp.exp(state.max - ref), jnp.exp(capped_at_zero(logits - ref[..., None]))


def capped_at_zero(d):
    """min(d, 0) as a value, with the derivative of d everywhere.

    d = logit − max is ≤ 0 exactly, but XLA may compute the logits once for the max and again
    for the exponentials (two fusions, rounded differently): at b² near its floor the logits
    are ~1e12, one ulp ~1e5, and exp(1e5) = inf made NaN (seen in the jitted LS XLA path at
    t = 1e-5). So the value is capped at 0. The derivative is not: a maximal logit rounded a
    few ulps above the max is still the maximal logit, and its weight (the largest, ~1) must
    keep its tangent. A select (``where(d > 0, 0, d)``) gave it a zero tangent: under jit, with
    the primal output unused (``native.with_reference_derivatives`` discards it), XLA fused
    the logits differently and the zero-padded ELS's forward-mode derivative was off by 36 %
    of its scale (``tests/test_reference.py``). A min would halve it at d = 0."""
    return d - jax.lax.stop_gradient(jnp.maximum(d, 0.0))


def update_with(state: SoftmaxState, logits, weighted_sum) -> SoftmaxState:
    """Adds one chunk of M candidates whose values are combined by ``weighted_sum``.

    Args:
      state: accumulators for queries of shape [*Q].
      logits: [*Q, M]; −inf marks an absent candidate.
      weighted_sum: p [*Q, M] ↦ Σ_c p_c·v_c, [*Q, D]. Lets a machine combine values without
        materialising them per candidate (e.g. the equivariant machine uses an FFT).
    """
    new_max, scale, p = _exponentials(state, logits)
    return SoftmaxState(
        max=new_max,
        total=state.total * scale + jnp.sum(p, axis=-1),
        acc=state.acc * scale[..., None] + weighted_sum(p),
    )


def update_with_total(state: SoftmaxState, logits, weighted_sum_and_total) -> SoftmaxState:
    """``update_with`` for a ``weighted_sum_and_total`` that returns [*Q, D+1]: Σ_c p_c·v_c and,
    in the last column, Σ_c p_c (e.g. one matmul against the values with a column of ones
    appended), so the exponentials are read once instead of twice."""
    new_max, scale, p = _exponentials(state, logits)
    both = weighted_sum_and_total(p)
    return SoftmaxState(
        max=new_max,
        total=state.total * scale + both[..., -1],
        acc=state.acc * scale[..., None] + both[..., :-1],
    )


def update(state: SoftmaxState, logits, values) -> SoftmaxState:
    """Adds one chunk of M candidates with explicit values.

    Args:
      state: accumulators for queries of shape [*Q].
      logits: [*Q, M].
      values: [M, D] (the same values for every query) or [*Q, M, D] (per-query values).
    """
    if values.ndim == 2:
        def weighted_sum(p):
            return jnp.matmul(p, values, precision=jax.lax.Precision.HIGHEST)
    else:
        def weighted_sum(p):
            return jnp.einsum("...m,...md->...d", p, values, precision=jax.lax.Precision.HIGHEST)
    return update_with(state, logits, weighted_sum)


def merge(s1: SoftmaxState, s2: SoftmaxState) -> SoftmaxState:
    """Combines partial states over disjoint candidate sets (associative, commutative)."""
    new_max = jnp.maximum(s1.max, s2.max)
    ref = _finite_or_zero(new_max)
    c1, c2 = jnp.exp(s1.max - ref), jnp.exp(s2.max - ref)
    return SoftmaxState(
        max=new_max,
        total=s1.total * c1 + s2.total * c2,
        acc=s1.acc * c1[..., None] + s2.acc * c2[..., None],
    )


def merge_across(state: SoftmaxState, axis_name) -> SoftmaxState:
    """``merge`` over a mapped/sharded axis (inside shard_map or pmap): every device ends with
    the state over the union of all devices' candidates.

    Differentiable: the common reference max is held constant (``pmax`` has no derivative
    rule). ``finalize`` and ``log_normalizer`` do not depend on the reference, so their
    derivatives are exact; only the merged ``max`` field itself reports a zero tangent."""
    new_max = jax.lax.pmax(jax.lax.stop_gradient(state.max), axis_name)
    scale = jnp.exp(state.max - _finite_or_zero(new_max))
    return SoftmaxState(
        max=new_max,
        total=jax.lax.psum(state.total * scale, axis_name),
        acc=jax.lax.psum(state.acc * scale[..., None], axis_name),
    )


def sharded(fn, mesh, in_specs, axis_name: str = "cands"):
    """fn(*args) → a pytree of SoftmaxStates, run with shard_map on ``mesh`` (args split by
    ``in_specs``; the candidates along ``axis_name``), every state merged exactly over the
    devices (``merge_across``): the result is replicated and equals the one-device state.
    The one way every machine shards its candidates."""
    from jax.sharding import PartitionSpec

    def per_device(*args):
        return jax.tree.map(lambda st: merge_across(st, axis_name), fn(*args),
                            is_leaf=lambda v: isinstance(v, SoftmaxState))
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(),
                         check_vma=False)


def chunk_starts(n: int, chunk_size: int):
    """Start rows of ceil(n/chunk) chunks that each hold exactly ``chunk_size`` of n rows.

    The last chunk is shifted back to end at row n, so a data set is never copied to pad it;
    its rows already seen by the previous chunk must be excluded: row r of chunk j is new iff
    r ≥ first_new[j]. Returns (starts, first_new), int32 [n_chunks].
    """
    n_chunks = -(-n // chunk_size)
    nominal = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_size
    starts = jnp.minimum(nominal, n - chunk_size)
    return starts, nominal - starts


def finalize(state: SoftmaxState):
    """The softmax-weighted mean Σ_c w_c v_c, [*Q, D]. Zero where no candidate was present.

    A query with any candidate has total ≥ 1 (its maximal logit contributes exp(0)); a total
    below ``_MIN_TOTAL`` means none (or exponentials that underflowed, see ``_exponentials``)
    and gives zero. Selecting rather than dividing by a floored total keeps the derivative
    finite there: d(acc/total) holds acc·d(total)/total², which is 0·inf = NaN at total = 0."""
    present = state.total > _MIN_TOTAL
    total = jnp.where(present, state.total, 1.0)
    return jnp.where(present[..., None], state.acc, 0.0) / total[..., None]


_MIN_TOTAL = 1e-15


def log_normalizer(state: SoftmaxState):
    """log Σ_c exp(logit_c), [*Q]."""
    return state.max + jnp.log(state.total)
