"""The reference path (els_jax/reference.py, issue 13): it equals the float64 oracles written
from docs/theory.md §2, and every engine (streamed functions, banked machines, the fused kernel) equals
it, values and forward-mode derivatives."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import els_jax as ej
from els_jax.engines import native
from els_jax.machines import reference
from tests import oracles

H = W = 6
N = 5


def _data(c=2, b=2, t=0.4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (N, H, W, c)).astype(np.float32)
    ab = oracles.alpha_bar(t)
    x = (math.sqrt(ab) * images[rng.integers(0, N, b)]
         + math.sqrt(1 - ab) * rng.normal(size=(b, H, W, c))).astype(np.float32)
    return images, x


MASK = np.array([True, False, True, True, False])

# name: (reference kwargs, oracle(x, t, images), C)
CASES = {
    "ideal mask": (dict(kind="ideal", mask=MASK),
                   lambda x, t, im: oracles.ideal_x0(x, t, im, mask=MASK), 2),
    "equivariant": (dict(kind="equivariant"), oracles.equivariant_x0, 1),
    "local k5": (dict(kind="local", k=5), lambda x, t, im: oracles.local_x0(x, t, im, 5), 2),
    "els circular k3": (dict(kind="els", k=3),
                        lambda x, t, im: oracles.els_x0(x, t, im, 3), 2),
    "els circular wrap k5 mask": (
        dict(kind="els", k=5, wrap_patches=True, mask=MASK),
        lambda x, t, im: oracles.els_x0(x, t, im, 5, "circular", True, mask=MASK), 1),
    "els zeros k3": (dict(kind="els", k=3, boundary="zeros"),
                     lambda x, t, im: oracles.els_x0(x, t, im, 3, "zeros"), 2),
    "els zeros k5": (dict(kind="els", k=5, boundary="zeros"),
                     lambda x, t, im: oracles.els_x0(x, t, im, 5, "zeros"), 1),
    "els zeros k7 (= local)": (dict(kind="els", k=7, boundary="zeros"),
                               lambda x, t, im: oracles.els_x0(x, t, im, 7, "zeros"), 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_equals_the_float64_oracle(name):
    kw, oracle, c = CASES[name]
    images, x = _data(c)
    for t in (0.03, 0.5, 1.0):
        got = np.asarray(reference.reference_x0(x, t, images, **kw))
        want = oracle(x.astype(np.float64), t, images)
        np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()),
                                   err_msg=f"t={t}")


def test_allowed_pairs_follow_the_spec_table():
    """Zero padding, k = 3 on 6×6: a corner pairs only with itself, an edge pixel with the
    interior centres of its own edge row, an interior pixel with the 16 interior centres;
    circular without wrap: every pixel with the 16 interior centres."""
    z = reference.allowed_pairs("els", 3, H, W, "zeros")
    assert z[0].sum() == 1 and z[0, 0]
    edge = 0 * W + 2                                             # row 0, column 2
    assert set(np.flatnonzero(z[edge])) == {1, 2, 3, 4}
    interior = 2 * W + 3
    assert z[interior].sum() == 16 and not z[interior, 0]
    assert (z == z.T).all()
    circ = reference.allowed_pairs("els", 3, H, W, "circular")
    assert (circ.sum(axis=1) == 16).all()
    assert reference.allowed_pairs("els", 3, H, W, "circular", wrap_patches=True).all()
    assert (reference.allowed_pairs("local", 3, H, W) == np.eye(H * W, dtype=bool)).all()


def _engines(name):
    """The fast paths of case ``name``: fn(x, t) → x̂_0 for each engine."""
    kw, _, _ = CASES[name]
    kind, k = kw["kind"], kw.get("k")
    mask = kw.get("mask")
    out = {}

    def machine(images, **mkw):
        m = ej.make_machine(kind, images, dedup_threshold=1.0, mask=mask, **mkw)
        return lambda x, t: ej.eps_to_x0(m(x, t, 0), x, t)

    if kind == "ideal":
        out["ideal_x0"] = lambda im: lambda x, t: ej.ideal_x0(x, t, im, mask=mask)
        out["machine"] = lambda im: machine(im)
    elif kind == "equivariant":
        out["equivariant_x0"] = lambda im: lambda x, t: ej.equivariant_x0(x, t, im)
    elif kind == "local":
        out["local_x0"] = lambda im: lambda x, t: ej.local_x0(x, t, im, k=k)
        out["machine"] = lambda im: machine(im, scales=k)
    else:
        boundary, wrap = kw.get("boundary", "circular"), kw.get("wrap_patches", False)
        for method in ("window", "row", "shiftmap"):
            out[f"els_x0 {method}"] = (lambda method: lambda im: lambda x, t: ej.els_x0(
                x, t, im, k=k, boundary=boundary, wrap_patches=wrap, mask=mask,
                method=method))(method)
        methods = (["window", "row", "shiftmap"]
                   + (["window_native"] if native.available() else []))
        if boundary == "zeros" and k < H and native.available():
            methods.append("native")
        if k < H or boundary == "circular":
            for method in methods:
                out[f"machine {method}"] = (lambda method: lambda im: machine(
                    im, scales=k, boundary=boundary, wrap_patches=wrap, method=method,
                    dedup=method != "native"))(method)
    return out


# (els zeros k5 meets the oracle above; its engines are those of k3, where the interior and
# the border bands are both wider than one pixel.)
@pytest.mark.parametrize("name", [n for n in CASES if n != "els zeros k5"])
def test_every_engine_equals_the_reference(name):
    kw, _, c = CASES[name]
    images, x = _data(c, seed=1)
    for t in (0.05, 0.5):
        want = np.asarray(reference.reference_x0(x, t, images, **kw))
        for engine, build in _engines(name).items():
            got = np.asarray(build(images)(jnp.asarray(x), jnp.float32(t)))
            np.testing.assert_allclose(got, want, atol=3e-4 * max(1.0, np.abs(want).max()),
                                       err_msg=f"{engine}, t={t}")


@pytest.mark.parametrize("name", ["els zeros k3", "els circular wrap k5 mask"])
def test_engine_derivatives_equal_the_reference(name):
    """Forward mode through each engine (the kernel's derivative comes from its XLA twin)
    equals forward mode through the reference, which plain autodiff differentiates."""
    kw, _, c = CASES[name]
    images, x = _data(c, seed=2)
    v = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    t = jnp.float32(0.4)
    _, want = jax.jvp(lambda z: reference.reference_x0(z, t, images, **kw), (x,), (v,))
    want = np.asarray(want)
    assert np.all(np.isfinite(want)) and np.abs(want).max() > 0.1
    for engine, build in _engines(name).items():
        if not engine.startswith("machine"):
            continue
        f = build(images)
        # Under jit, as a researcher composes it: XLA fuses the logits differently there, and
        # the old cap of logit − max gave the maximal logit a zero tangent (native: 36 % off).
        _, got = jax.jit(lambda z, v: jax.jvp(lambda z: f(z, t), (z,), (v,)))(
            jnp.asarray(x), jnp.asarray(v))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-3 * np.abs(want).max(),
                                   err_msg=engine)


def test_reference_rejects_bad_input():
    images, x = _data(1)
    with pytest.raises(ValueError, match="unknown machine"):
        reference.reference_x0(x, 0.5, images, kind="gaussian")
    with pytest.raises(ValueError, match="odd"):
        reference.reference_x0(x, 0.5, images, kind="els", k=4)
