"""The candidate banks ``make_machine`` built most recently, kept by content so that a machine
built again on the same data (the experiment's calibration machines, then its comparison from
each start) reuses them instead of rebuilding."""

from __future__ import annotations

import hashlib
import os
import threading

import jax
import numpy as np

__all__ = ["BANKS", "clear_bank_cache", "content_key", "mesh_key"]


class _BankCache:
    """The ELS/ideal banks built most recently, by content (the images' bytes and every
    setting that shapes the bank): a machine built again on the same data (the experiment's
    calibration machines, then its comparison from each start) reuses them instead of
    rebuilding (seconds per patch size at N = 5000: windows extracted, hashed, merged). Least
    recently used first out, at most ``ELS_JAX_BANK_CACHE_MB`` MiB of banks (default 4096;
    0 turns it off). Banks are immutable arrays, so sharing them is safe."""

    def __init__(self):
        self._entries: dict = {}              # key → (bank, spec, bytes), oldest first
        self._lock = threading.Lock()

    @staticmethod
    def budget() -> int:
        return int(float(os.environ.get("ELS_JAX_BANK_CACHE_MB", "4096")) * (1 << 20))

    def get(self, key, build):
        with self._lock:
            if key in self._entries:
                entry = self._entries.pop(key)
                self._entries[key] = entry        # most recent last
                return entry[0], entry[1]
        bank, spec = build()
        # (a bank's ``images``, read by the zero-padded border's kernel, are the machine's own
        # array, shared with it and with every other size: not the bank's bytes)
        own = bank._replace(images=None) if hasattr(bank, "images") else bank
        size = sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(own))
        budget = self.budget()
        with self._lock:
            if size <= budget:
                self._entries[key] = (bank, spec, size)
                while sum(e[2] for e in self._entries.values()) > budget:
                    self._entries.pop(next(iter(self._entries)))
        return bank, spec

    def clear(self):
        with self._lock:
            self._entries.clear()


BANKS = _BankCache()


def clear_bank_cache():
    """Drops the banks kept for reuse by later ``make_machine`` calls (``_BankCache``)."""
    BANKS.clear()


def content_key(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).view(np.uint8)).hexdigest() + str(
        images.shape)


def mesh_key(mesh):
    if mesh is None:
        return None
    return (tuple(d.id for d in mesh.devices.flat), tuple(mesh.axis_names))
