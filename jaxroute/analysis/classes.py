"""Class bookkeeping for analyses over labelled sets: images per class, attack targets."""
from __future__ import annotations

import numpy as np


def per_class_counts(labels, k: int) -> np.ndarray:
    """(K,) number of images of each class 0..k-1 (0 for an absent class)."""
    return np.bincount(np.asarray(labels), minlength=k)


def derangement(k: int, seed: int) -> np.ndarray:
    """A random permutation of range(k) without fixed points, drawn from ``seed``.

    Used as targets of a targeted attack: every class is attacked towards another class,
    and the same seed gives the same targets on every set.
    """
    if k < 2:
        raise ValueError("a derangement needs at least 2 classes")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(k)
        if np.all(p != np.arange(k)):
            return p
