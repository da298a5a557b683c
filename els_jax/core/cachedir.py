"""The one directory where els_jax keeps what it computes once per machine and reuses across
processes: the fused CPU kernels (``engines/native.py``), the measured engine choices
(``engines/autotune.py``), XLA's compiled programs (``cli.enable_compilation_cache``) and the
parsed embedded MNIST digits (``data``), the data's merge estimates and window groupings
(``engines/autotune.remembered*``). ``$ELS_JAX_CACHE``, default ``~/.cache/els_jax``; every
entry is written atomically (a temporary file renamed over it, ``write_npz_atomic`` for
arrays), so a killed process leaves the old entry or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["cache_dir", "write_npz_atomic"]


def cache_dir() -> Path:
    """``$ELS_JAX_CACHE``, default ``~/.cache/els_jax`` (not created here)."""
    return Path(os.environ.get("ELS_JAX_CACHE", Path.home() / ".cache" / "els_jax"))


def write_npz_atomic(path, **arrays):
    """``np.savez`` of ``arrays`` to ``path`` through a temporary file in the same directory
    renamed over it (created with its parents): a reader sees the old file or the new one,
    whole. Raises OSError (e.g. a read-only directory); the temporary file never stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
