"""scikit-learn's bundled 8x8 digits: a data set that needs no download.

It ships inside scikit-learn, so tests and examples run offline and in
seconds. The split is stratified and seeded so "train"/"test" are the same on
every machine and every sklearn release that keeps the data unchanged.
"""
from __future__ import annotations

import numpy as np

from .core import Dataset

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SEED = 0


def split_indices(split: str, target: np.ndarray | None = None) -> np.ndarray:
    """Row indices of ``split`` into ``load_digits()``, ascending.

    Ascending (rather than the shuffled order train_test_split returns) keeps
    the file's own order, which already cycles through the classes, so a
    ``limit`` prefix is roughly balanced.
    """
    from sklearn.model_selection import train_test_split

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for 'digits'; expected one of {SPLITS}")
    if target is None:
        from sklearn.datasets import load_digits

        target = load_digits().target
    y = np.asarray(target)
    train, test = train_test_split(np.arange(len(y)), test_size=TEST_FRACTION, random_state=SEED, stratify=y)
    return np.sort(train if split == "train" else test)


def load_digits_dataset(split: str = "test", limit: int | None = None) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = split_indices(split, d.target)
    if limit is not None:
        idx = idx[:limit]
    images = (d.images[idx] / 16.0).astype(np.float32)[..., None]
    labels = d.target[idx].astype(np.int32)
    return Dataset(images, labels, tuple(str(i) for i in range(10)), f"digits:{split}")
