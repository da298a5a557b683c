"""The run folder's files: atomic text / JSON / npz writers, the JSON reader, and the
per-stage timer (timings.json).

Every stage of ``reproduce`` writes through these, so that a reader (or a resumed run) sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os

from els_jax.core.cachedir import write_npz_atomic

__all__ = ["atomic_write_text", "atomic_json", "atomic_npz", "read_json", "Timer"]

_TIMINGS_FILE = "timings.json"


def atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)          # readers see the old file or the new one, never half


def atomic_json(path: str, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_npz(path: str, **arrays):
    write_npz_atomic(path, **arrays)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


class Timer:
    """Seconds per stage, accumulated over resumed sessions in timings.json."""

    def __init__(self, out):
        self.path = os.path.join(out, _TIMINGS_FILE)
        self.times = read_json(self.path) if os.path.exists(self.path) else {}

    def add(self, stage, seconds):
        self.times[stage] = round(self.times.get(stage, 0.0) + seconds, 3)
        atomic_json(self.path, self.times)

    @property
    def total(self):
        return round(sum(self.times.values()), 3)
