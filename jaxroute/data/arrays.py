"""Splits stored as arrays: ``DIR/SPLIT.npz`` with ``images``, ``labels`` and optional extras.

The format ``jaxroute attack`` writes its adversarial images in, and
``load_dataset(DIR, SPLIT)`` reads: ``images`` (N, H, W, C) float in [0, 1]
or uint8, ``labels`` (N,), optional ``class_names``; any further per-sample
arrays (``adv_pred``, ``target``, ``success``, ...) ride along.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .core import Dataset

# What reading a truncated or damaged .npz raises: a missing zip directory, a short or corrupt
# member (zlib, EOF), a bad .npy header (ValueError) or an unreadable file (OSError).
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def arrays_split_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"{split}.npz"


def save_arrays_split(root: str | os.PathLike, split: str, images, labels, class_names=None, **extra) -> Path:
    """Write ``ROOT/SPLIT.npz`` atomically; returns its path."""
    from jaxroute.utils.io import atomic_save_npz

    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"need images (N, H, W, C) and N labels, got {images.shape} and {labels.shape}")
    arrays = {"images": images, "labels": labels, **{k: np.asarray(v) for k, v in extra.items()}}
    if class_names is not None:
        arrays["class_names"] = np.array([str(c) for c in class_names])
    path = arrays_split_path(root, split)
    atomic_save_npz(path, **arrays)
    return path


def load_arrays_split(path: Path, limit: int | None) -> Dataset:
    """Read a split written by :func:`save_arrays_split` (first ``limit`` samples)."""
    from .core import as_dataset

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("images", "labels", "class_names") if k in z.files}
            files = z.files
    except NPZ_ERRORS as e:
        raise ValueError(f"{path} is not a readable .npz file of arrays (truncated or damaged?): "
                         f"{type(e).__name__}: {e}") from None
    missing = {"images", "labels"} - set(arrays)
    if missing:
        raise ValueError(f"{path} lacks arrays {sorted(missing)} (has {files})")
    images, labels = arrays["images"], arrays["labels"]
    names = tuple(str(c) for c in arrays["class_names"]) if "class_names" in arrays else None
    n = len(labels) if limit is None else min(limit, len(labels))
    return as_dataset(images[:n], labels[:n], names, name=str(path))
