"""Resumable result folders: one set of arguments per cache, and what building it cost.

A long experiment caches its expensive stages (attacks, routing, detectors)
so that a killed run, started again, resumes.  Reuse is only sound when the
cache was written with the same arguments; :func:`check_cache_config` records
them on first use and refuses a mismatch, instead of silently mixing results.
:class:`Timings` keeps the seconds per stage, summing the cached stages over
invocations so a resumed run still reports the full cost of its cache.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from jaxroute.utils.io import atomic_save_npz, atomic_write_json, jsonable


def cached_json(path, make: Callable[[], Any]) -> Any:
    """The JSON value at ``path``; when absent, ``make()`` is computed and written atomically.

    The value is always the one read back from the file, so a first run and a
    resumed one see the same types (lists, plain floats).
    """
    path = Path(path)
    if not path.exists():
        atomic_write_json(path, make())
    return json.loads(path.read_text())


def cached_npz(path, make: Callable[[], dict]) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path``; when absent, ``make()`` (name -> array) is computed and
    saved atomically first."""
    path = Path(path)
    if not path.exists():
        atomic_save_npz(path, **make())
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def fingerprint(arrays: Iterable) -> str:
    """A short SHA-256 fingerprint of the values of ``arrays`` (in order, as float32): what a
    cached result computed from them depends on (weights, gates)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    return h.hexdigest()[:16]


def check_cache_config(cache, key: dict) -> None:
    """Refuse ``cache`` if it was written with another ``key``; record ``key`` in a new one.

    ``key`` holds the arguments that determine the cached results (JSON-able; tuples
    compare equal to lists).  Stored as ``config.json`` in ``cache``.
    """
    cache = Path(cache)
    path = cache / "config.json"
    key = json.loads(json.dumps(key, default=jsonable))
    if path.exists():
        old = json.loads(path.read_text())
        if old != key:
            diff = {k: (old.get(k), v) for k, v in key.items() if old.get(k) != v}
            raise ValueError(f"{cache} holds results of other arguments {diff}; use another output folder, "
                             "or delete that cache folder to start over")
    else:
        atomic_write_json(path, key)


class Timings:
    """Seconds per stage: ``now`` for this invocation, ``total`` for the ``cached`` stages
    summed over every invocation that used the cache (kept in the JSON file ``path``)."""

    def __init__(self, path, cached: Iterable[str] = ()):
        self.path = Path(path)
        self.cached = frozenset(cached)
        self.total: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.now: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        """Count ``seconds`` for ``stage``; a cached stage's total is saved at once, so a killed
        run keeps what it spent."""
        self.now[stage] = self.now.get(stage, 0.0) + seconds
        if stage in self.cached:
            # re-read first: runs of different models may share one cache and its file
            if self.path.exists():
                self.total = {**self.total, **json.loads(self.path.read_text())}
            self.total[stage] = self.total.get(stage, 0.0) + seconds
            atomic_write_json(self.path, self.total)
