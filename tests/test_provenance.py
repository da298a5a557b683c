"""Provenance of a machine's output: top-K sources, entropy, N_eff, the mosaic (issue 6)."""

import numpy as np
import pytest

import els_jax as ej
from els_jax.machines import posterior as pv
from tests import oracles


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 6, 6, 1)).astype(np.float32)
    x = rng.normal(size=(2, 6, 6, 1)).astype(np.float32)
    return images, x


@pytest.mark.parametrize("boundary,k,wrap", [("zeros", 3, False), ("circular", 3, False),
                                             ("circular", 3, True), ("zeros", 5, False)])
def test_top_k_and_entropy_equal_brute_force(tiny, boundary, k, wrap):
    images, x = tiny
    t = 0.3
    p = pv.provenance(x, t, images, kind="els", k=k, boundary=boundary, wrap_patches=wrap,
                      top_k=3, block=64)                  # small block: many streamed chunks
    for b in range(2):
        for i in range(6):
            for j in range(6):
                logits, vals, img, u, v = oracles.els_candidates(x[b], i, j, t, images, k,
                                                                 boundary, wrap)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                order = np.argsort(-w, kind="stable")[:3]
                np.testing.assert_array_equal(np.asarray(p.image[b, i, j]), img[order])
                np.testing.assert_array_equal(np.asarray(p.row[b, i, j]), u[order])
                np.testing.assert_array_equal(np.asarray(p.col[b, i, j]), v[order])
                np.testing.assert_allclose(np.asarray(p.weight[b, i, j]), w[order], atol=2e-5)
                ent = -np.sum(w * np.log(np.maximum(w, 1e-300)))
                assert float(p.entropy[b, i, j]) == pytest.approx(ent, abs=2e-4)
                np.testing.assert_allclose(np.asarray(p.x0[b, i, j]), w @ vals, atol=2e-5)


@pytest.mark.parametrize("kind,boundary", [("els", "zeros"), ("ideal", "zeros")])
def test_uint8_images_give_the_provenance_of_their_unit_values(kind, boundary):
    """uint8 pixels are held as uint8 and converted a chunk at a time (no float copy of the
    set): the same sources, weights and x̂_0 as the float32 images (u − 127.5)/127.5, over
    several chunks, and with a class mask."""
    rng = np.random.default_rng(3)
    u8 = rng.integers(0, 256, (9, 6, 5, 2), dtype=np.uint8)
    u8[4] = u8[1]                                     # duplicates: ties broken the same way
    x = rng.normal(size=(2, 6, 5, 2)).astype(np.float32)
    unit = ej.data.unit_images(u8)
    assert unit.dtype == np.float32 and np.all(np.abs(unit) <= 1)
    mask = np.arange(9) % 3 != 1
    k = None if kind == "ideal" else 3
    for m in (None, mask):
        got = pv.provenance(x, 0.2, u8, kind=kind, k=k, boundary=boundary, mask=m, top_k=3,
                            block=48)
        want = pv.provenance(x, 0.2, unit, kind=kind, k=k, boundary=boundary, mask=m,
                             top_k=3, block=48)
        for field in ("image", "row", "col"):
            np.testing.assert_array_equal(np.asarray(getattr(got, field)),
                                          np.asarray(getattr(want, field)))
        for field in ("weight", "entropy", "x0"):
            np.testing.assert_allclose(np.asarray(getattr(got, field)),
                                       np.asarray(getattr(want, field)), atol=1e-5)


def test_t_to_zero_provenance_is_the_nearest_candidate(tiny):
    """At t → 0 each pixel's source is the nearest (L2) candidate window; one candidate takes
    all the weight, so the entropy is 0 and the output is that candidate's centre."""
    images, _ = tiny
    rng = np.random.default_rng(1)
    x = (images[[0, 2]] + 0.3 * rng.normal(size=(2, 6, 6, 1))).astype(np.float32)
    k = 3
    p = pv.provenance(x, 1e-4, images, kind="els", k=k, boundary="zeros", top_k=1)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                q, _ = oracles.window(x[b].astype(np.float64), i, j, k, "zeros")
                _, vals, img, u, v = oracles.els_candidates(x[b], i, j, 0.5, images, k, "zeros")
                d = [np.sum((q - oracles.window(images[n].astype(np.float64), uu, vv, k,
                                                 "zeros")[0]) ** 2)
                     for n, uu, vv in zip(img, u, v)]
                best = int(np.argmin(d))
                assert (int(p.image[b, i, j, 0]), int(p.row[b, i, j, 0]),
                        int(p.col[b, i, j, 0])) == (img[best], u[best], v[best])
    np.testing.assert_allclose(np.asarray(p.weight[..., 0]), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(p.entropy), 0.0, atol=1e-3)
    np.testing.assert_allclose(pv.mosaic_image(p, images), np.asarray(p.x0), atol=1e-4)


def test_entropy_of_identical_candidates_is_log_m():
    """M identical training images: every pixel's posterior is uniform over the M copies of
    each equally good window; with a constant image all windows are equal: log(M·#windows)."""
    m = 5
    images = np.full((m, 5, 5, 1), 0.25, np.float32)
    x = np.random.default_rng(2).normal(size=(1, 5, 5, 1)).astype(np.float32)
    p = pv.provenance(x, 0.4, images, kind="ideal", top_k=2)
    np.testing.assert_allclose(np.asarray(p.entropy), np.log(m), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(p.n_eff), m, rtol=1e-3)
    p = pv.provenance(x, 0.4, images, kind="els", k=3, boundary="circular", top_k=2)
    np.testing.assert_allclose(np.asarray(p.entropy), np.log(m * 9), rtol=1e-4)   # 3×3 inner


def test_ideal_and_local_provenance_and_mask(tiny):
    images, x = tiny
    for kind, ref in (("ideal", oracles.ideal_x0(x, 0.5, images)),
                      ("local", oracles.local_x0(x, 0.5, images, 3))):
        p = pv.provenance(x, 0.5, images, kind=kind, k=3, top_k=2)
        np.testing.assert_allclose(np.asarray(p.x0), ref, atol=2e-5)
        rows = np.asarray(p.row[0, :, :, 0])
        np.testing.assert_array_equal(rows, np.repeat(np.arange(6)[:, None], 6, 1))
    mask = np.array([False, True, False, True])
    p = pv.provenance(x, 0.5, images, kind="els", k=3, boundary="zeros", mask=mask, top_k=4)
    assert set(np.unique(np.asarray(p.image))) == {-1, 1, 3}
    # A corner has exactly 2 candidates (its own window in images 1 and 3): slots 3–4 empty.
    assert list(np.asarray(p.image[0, 0, 0, 2:])) == [-1, -1]
    np.testing.assert_allclose(np.asarray(p.weight[0, 0, 0, 2:]), 0.0)
    np.testing.assert_allclose(np.asarray(p.x0),
                               oracles.els_x0(x, 0.5, images, 3, "zeros", mask=mask), atol=2e-5)


def test_creativity_separates_memorised_from_new(tiny):
    images, _ = tiny
    # A memorised sample: a training image itself; a new one: left half of image 0 beside
    # the right half of image 1 (every 3×3 window off the seam is a training window).
    new = np.concatenate([images[0, :, :3], images[1, :, 3:]], axis=1)
    samples = np.stack([images[2], new])
    p = pv.provenance(samples, 1e-4, images, kind="els", k=3, boundary="zeros", top_k=1)
    c = pv.creativity(samples, images, p)
    assert c["d_train"][0] == pytest.approx(0.0, abs=1e-6) and c["nearest_train"][0] == 2
    assert c["n_sources"][0] == 1
    # Far from every training image, but much closer to its own patch mosaic (only the
    # windows across the seam are not training windows).
    assert c["d_train"][1] > 0.3 and c["d_mosaic"][1] < 0.5 * c["d_train"][1]
    assert c["n_sources"][1] >= 2


def test_nearest_training_streams_chunks_and_equals_the_dense_argmin():
    """nearest_training reads the images a chunk at a time: the same index (the first on
    ties, also across chunks) and RMS distance as the dense float64 computation, for uint8
    images as their (u − 127.5)/127.5 values."""
    rng = np.random.default_rng(3)
    pix = rng.integers(0, 256, (23, 4, 5, 2), dtype=np.uint8)
    pix[17] = pix[4]                                  # a tie across chunks: 4 must win
    images = ej.core.data.unit_images(pix).astype(np.float64)
    samples = np.concatenate([images[[4, 9]] + 0.01, rng.normal(size=(3, 4, 5, 2))])
    d2 = ((samples.reshape(5, 1, -1) - images.reshape(1, 23, -1)) ** 2).sum(-1)
    for imgs in (pix, images.astype(np.float32)):
        for chunk in (1, 5, 100):
            idx, rms = pv.nearest_training(samples, imgs, chunk=chunk)
            np.testing.assert_array_equal(idx, d2.argmin(1))
            np.testing.assert_allclose(rms, np.sqrt(d2.min(1) / 40), rtol=1e-6)
    assert idx[0] == 4
    with pytest.raises(ValueError, match="like the samples"):
        pv.nearest_training(samples, pix[:, :3])


def test_provenance_rejects_bad_input(tiny):
    images, x = tiny
    with pytest.raises(ValueError, match="kind"):
        pv.provenance(x, 0.5, images, kind="equivariant")
    with pytest.raises(ValueError):
        pv.provenance(x, 0.5, images, kind="els", k=4)


def test_mosaic_run_writes_figure_and_numbers(tmp_path):
    """The mosaic command's engine, with a machine standing in for the network."""
    import json
    import jax
    from els_jax.experiment.mosaic import mosaic_run
    digits, _ = ej.load_dataset("digits", max_examples=40)
    # uint8 pixels (as TFDS and mnist5k hand them out) are kept as uint8; the stand-in network
    # is the machine on their float32 values.
    images = np.round((np.asarray(digits) + 1) * 127.5).astype(np.uint8)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2,) + images.shape[1:])
    stand_in = ej.make_machine("els", ej.data.unit_images(images), scales=3, boundary="zeros")
    info = mosaic_run(images, x_T, 3, steps=4, network_eps=stand_in, network_steps=4,
                      out=str(tmp_path), seeds=[0, 1])
    for f in ("mosaic.png", "mosaic.json", "mosaic.npz"):
        assert (tmp_path / f).exists()
    saved = json.loads((tmp_path / "mosaic.json").read_text())
    assert saved["creativity"] == info["creativity"]
    # The stand-in network is the same machine on the same values: same samples, same
    # provenance.
    els, net = info["creativity"]["ELS"], info["creativity"]["network"]
    np.testing.assert_allclose(els["d_train"], net["d_train"], atol=1e-5)
    assert els["n_sources"] == net["n_sources"]
    z = np.load(tmp_path / "mosaic.npz")
    assert z["entropy"].shape[:2] == (2, 4) and np.all(np.isfinite(z["entropy"]))
