"""The one directory where els_jax keeps what it computes once per machine and reuses across
processes: the fused CPU kernels (``engines/native.py``), the measured engine choices
(``engines/autotune.py``), XLA's compiled programs (``cli.enable_compilation_cache``) and the
parsed embedded MNIST digits (``data``). ``$ELS_JAX_CACHE``, default ``~/.cache/els_jax``;
every entry is written atomically (a temporary file renamed over it), so a killed process
leaves the old entry or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$ELS_JAX_CACHE``, default ``~/.cache/els_jax`` (not created here)."""
    return Path(os.environ.get("ELS_JAX_CACHE", Path.home() / ".cache" / "els_jax"))
