"""Class bookkeeping for analyses over labelled sets: images per class, attack targets."""
from __future__ import annotations

import numpy as np

from jaxroute.utils.checks import check_int


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


def first_per_class(labels, n: int, k: int) -> np.ndarray:
    """Indices of the first ``n`` images of each class 0..k-1, in their original order.

    The fixed sets of the analyses ("the first 100 test images per class"); a class with
    fewer than ``n`` images is a ValueError naming the counts.
    """
    labels = np.asarray(labels)
    check_int(n, "images per class")
    counts = per_class_counts(labels, k)
    if len(counts) > k or np.any(counts < n):
        raise ValueError(f"need {n} images of each of {k} classes, the labels hold {counts.tolist()} per class")
    rank = np.zeros(len(labels), np.int64)   # position of each image within its class
    for c in range(k):
        rank[labels == c] = np.arange(counts[c])
    return np.flatnonzero(rank < n)


def load_first_per_class(spec: str, split: str, n: int):
    """The first ``n`` images of each class of a data set's split, as a Dataset (the analyses' fixed sets).

    An ImageFolder's canonical order interleaves the classes, so that is its first
    ``K·n`` images, read alone; another source is read whole and the first ``n`` of
    each class kept (a class with fewer is a ValueError naming the counts).
    """
    from jaxroute.data import as_dataset, load_dataset

    check_int(n, "images per class")
    k = len(load_dataset(spec, split, limit=1).class_names)
    ds = load_dataset(spec, split, limit=k * n)
    if np.all(per_class_counts(ds.labels, k) == n):
        return ds
    ds = load_dataset(spec, split)
    idx = first_per_class(ds.labels, n, k)
    return as_dataset(np.asarray(ds.images)[idx], np.asarray(ds.labels)[idx], ds.class_names, name=f"{spec}:{split}")
