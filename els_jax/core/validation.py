"""Input checks shared by the machines: clear errors instead of shape mismatches deep in XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_query_and_images", "mask_log_weights", "check_patch_size", "visible_memory",
           "check_fits"]


def check_query_and_images(x, images):
    """x: [B, H, W, C] queries; images: [N, H, W, C] training set (same H, W, C)."""
    if getattr(images, "ndim", None) != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {getattr(images, 'shape', None)}")
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must be a batch [B, H, W, C]; got shape {getattr(x, 'shape', None)} "
                         "(add a batch axis with x[None] for one image)")
    if tuple(x.shape[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"x images {tuple(x.shape[1:])} and training images "
                         f"{tuple(images.shape[1:])} differ in H, W or C")
    if images.shape[0] == 0:
        raise ValueError("the training set is empty")


def mask_log_weights(mask, n: int):
    """Log prior weight per training image: 0 where selected, −inf where masked out. [N]."""
    if mask is None:
        return jnp.zeros((n,), jnp.float32)
    if mask.shape != (n,):
        raise ValueError(f"mask must be a boolean vector over the {n} training images; "
                         f"got shape {mask.shape}")
    if not isinstance(mask, jax.core.Tracer) and not np.any(np.asarray(mask)):
        raise ValueError("mask selects no training image")
    return jnp.where(jnp.asarray(mask, bool), 0.0, -jnp.inf).astype(jnp.float32)


def check_patch_size(k, height: int, width: int):
    """Patch sizes are odd positive ints (a window centred on its pixel)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"patch size k must be an int; got {k!r}")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"patch size k must be odd and positive (a window centred on its "
                         f"pixel); got {k}")
    return int(k)


def visible_memory(device=None) -> int | None:
    """Bytes a computation on ``device`` (default: the first) can still use: an accelerator's
    free memory (``memory_stats``), or on a CPU the host's available memory (MemAvailable of
    /proc/meminfo). None when neither can be read."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            return None
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(nbytes: int, what: str, knob: str, device=None):
    """Raises a ValueError naming ``what``, its size and the ``knob`` that changes it, before
    anything is allocated, when ``nbytes`` exceed ``visible_memory``."""
    free = visible_memory(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} need {nbytes / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB this machine can use now; {knob}")
