"""Argument checks shared by the configs and entry points: one rule and one message each."""
from __future__ import annotations

import math

import numpy as np


def check_int(value, name: str, minimum: int = 1, *, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` if it is an integer (Python or NumPy) >= ``minimum`` (or None, with
    ``allow_none``), else a ValueError naming ``name``.  ``bool`` is refused: ``True`` would
    silently mean 1."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_finite(value, name: str) -> float:
    """``value`` as a ``float`` if it is a finite real number, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
