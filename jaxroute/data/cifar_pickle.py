"""The original CIFAR-10 python batches (the unpacked ``cifar-10-python.tar.gz``).

These are the exact pixels models are published on (unlike JPEG re-encodings),
and reading them needs only pickle and numpy. The files are pickles: load only
copies obtained from a source you trust, as with any pickle.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .core import Dataset
from .stored import unit_float

META = "batches.meta"
SPLIT_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
LAYOUT = f"a folder with {META}, data_batch_1..data_batch_5 and test_batch (cifar-10-python.tar.gz unpacked)"


def is_cifar_pickle_dir(path) -> bool:
    return (Path(path) / META).is_file()


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR-10 batch file {path}; expected {LAYOUT}")
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="bytes")
        except Exception as e:
            raise ValueError(f"{path} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from e


def _get(d: dict, key: str, path: Path):
    for k in (key.encode(), key):  # files written by python 3 code may use str keys
        if k in d:
            return d[k]
    raise ValueError(f"{path} has no {key!r} entry; keys are {list(d)}")


def load_cifar_pickle_uint8(root, split: str = "test", limit: int | None = None):
    """uint8 (N, 32, 32, 3) images, int32 labels, class names, in the batches' own order.

    Batches are read only until ``limit`` samples are in hand.
    """
    root = Path(root).expanduser().absolute()
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown split {split!r} for CIFAR-10 batches in {root}; expected one of "
                         f"{tuple(SPLIT_FILES)}")
    meta_path = root / META
    names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                  for n in _get(_unpickle(meta_path), "label_names", meta_path))
    xs, ys, have = [], [], 0
    for fname in SPLIT_FILES[split]:
        path = root / fname
        d = _unpickle(path)
        data = np.asarray(_get(d, "data", path), dtype=np.uint8)
        labels = np.asarray(_get(d, "labels", path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"{path}: expected data (N, 3072) and N labels, got data {data.shape} and "
                             f"{len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"{path}: labels outside 0..{len(names) - 1}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows are CHW, row-major
        ys.append(labels)
        have += len(labels)
        if limit is not None and have >= limit:
            break
    images = np.ascontiguousarray(np.concatenate(xs)[:limit])
    labels = np.concatenate(ys)[:limit].astype(np.int32)
    return images, labels, names


def load_cifar_pickle(root, split: str = "test", limit: int | None = None) -> Dataset:
    images, labels, names = load_cifar_pickle_uint8(root, split, limit)
    return Dataset(unit_float(images), labels, names, f"{Path(root).name}:{split}")
