"""The in-memory data set type, user-array wrapping and fixed-shape batching.

Every source (digits, ImageFolder, CIFAR pickles, tfds) ends in the same
``Dataset``: NHWC float32 images in [0, 1] and int32 labels. One type means the
routing and training code never has to know where the pixels came from.  The
images may also be a :class:`~jaxroute.data.stored.StoredImages` view (uint8
on disk, read per batch by :func:`batches`): a data set that streams.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from jaxroute.utils.checks import check_int

from .stored import StoredImages, read_rows, unit_float


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images (N, H, W, C) float32 in [0, 1], labels (N,) int32, class names.

    ``images`` is a numpy array, or a lazy view whose pixels are read batch by
    batch (``load_dataset(..., stream=True)``): a ``StoredImages`` (decoded
    cache on disk) or a ``StreamImages`` (decoded per record by grain,
    :mod:`jaxroute.data.pipeline`); code that needs the whole array calls
    :meth:`materialize`.

    ``__post_init__`` checks only structure (shapes, dtypes), which is O(1):
    loaders build datasets of tens of thousands of images and slicing code
    (``Dataset(ds.images[a:b], ...)``) builds many small ones, so a full value
    scan here would be paid again and again. ``as_dataset`` does the full
    value check for arrays that come from outside.
    ``eq=False`` because element-wise numpy ``==`` has no single truth value.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str = "arrays"
    # How the pixels were made, for outputs to record (JSON-able; e.g. the preprocessing and the
    # files left out); None for arrays given as they are.
    info: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not isinstance(self.class_names, tuple):
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if _is_lazy(self.images):
            pass  # checked when opened: uint8 (N, H, W, C) records, read as float32 in [0, 1]
        elif not isinstance(self.images, np.ndarray) or self.images.ndim != 4:
            raise ValueError(f"Dataset {self.name!r}: images must be a 4-D (N, H, W, C) numpy array, got "
                             f"{type(self.images).__name__} of shape {getattr(self.images, 'shape', None)}")
        if self.images.dtype != np.float32:
            raise TypeError(f"Dataset {self.name!r}: images must be float32 in [0, 1], got {self.images.dtype} "
                            "(use jaxroute.data.as_dataset to convert uint8 or float64 arrays)")
        if not isinstance(self.labels, np.ndarray) or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"Dataset {self.name!r}: labels must have shape ({self.images.shape[0]},), got "
                             f"{getattr(self.labels, 'shape', None)}")
        if self.labels.dtype != np.int32:
            raise TypeError(f"Dataset {self.name!r}: labels must be int32, got {self.labels.dtype}")
        if not all(isinstance(c, str) for c in self.class_names):
            raise TypeError(f"Dataset {self.name!r}: class_names must be strings, got {self.class_names!r}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    @property
    def streams(self) -> bool:
        """True when the images are read per batch (a ``StoredImages`` or ``StreamImages`` view)."""
        return _is_lazy(self.images)

    def materialize(self) -> "Dataset":
        """This data set with its images in memory (a no-op unless it streams)."""
        if not self.streams:
            return self
        return Dataset(self.images.read(), self.labels, self.class_names, self.name, self.info)

    def take(self, n: int) -> "Dataset":
        """The first ``n`` samples: the canonical order makes this a fair subset."""
        n = check_int(n, "n")
        return Dataset(self.images[:n], self.labels[:n], self.class_names, self.name, self.info)


def _is_lazy(images) -> bool:
    from .pipeline import StreamImages

    return isinstance(images, (StoredImages, StreamImages))


def as_dataset(images, labels, class_names: Sequence[str] | None = None, name: str = "arrays") -> Dataset:
    """Wrap user arrays into a ``Dataset`` after checking them fully.

    Values are scanned here (NaN, range) because arrays from outside are where
    silent mistakes come from: 0..255 floats, a forgotten normalisation, NHWC vs
    NCHW. uint8 is taken as 0..255 pixels and divided by 255.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C), got shape {images.shape}")
    if images.dtype == np.uint8:
        images = unit_float(images)
    elif np.issubdtype(images.dtype, np.floating):
        if np.isnan(images).any():
            bad = np.argwhere(np.isnan(images))[0]
            raise ValueError(f"images contain NaN (first at index {tuple(int(i) for i in bad)})")
        lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float images must lie in [0, 1], got values in [{lo}, {hi}] "
                             "(divide 0..255 pixels by 255, or pass uint8)")
        images = images.astype(np.float32, copy=False)
    else:
        raise TypeError(f"images must be floating (in [0, 1]) or uint8 (0..255), got dtype {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    top = int(labels.max()) if labels.size else -1
    if class_names is None:
        class_names = tuple(str(i) for i in range(top + 1))
    class_names = tuple(str(c) for c in class_names)
    if top >= len(class_names):
        raise ValueError(f"label {top} out of range for {len(class_names)} class names")
    return Dataset(images, labels.astype(np.int32), class_names, name)


class Batch(NamedTuple):
    """One fixed-shape batch; rows ``n_valid:`` are padding and must be masked out."""

    images: np.ndarray
    labels: np.ndarray | None
    n_valid: int

    def mask(self) -> np.ndarray:
        """Boolean (batch,) mask of real rows, for masked means in jitted code."""
        return np.arange(self.images.shape[0]) < self.n_valid


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """How many batches ``batches`` yields for ``n`` samples (before ``start``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    batch_size = check_int(batch_size, "batch_size")
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    # Repeat the last real row rather than zeros: padding stays in-distribution,
    # so nothing downstream (normalisation, log-softmax) sees degenerate input.
    extra = np.repeat(a[-1:], size - a.shape[0], axis=0)
    return np.concatenate([a, extra], axis=0)


def batches(data, batch_size: int, *, drop_remainder: bool = False, pad: bool = True,
            start: int = 0) -> Iterator[Batch]:
    """Yield ``Batch(images, labels, n_valid)`` of one fixed shape.

    Every batch has ``batch_size`` rows (with ``pad=True``) so a jitted consumer
    compiles once; the last partial batch repeats its last sample and reports
    the true count in ``n_valid``. ``start`` is a batch index: resumable jobs
    skip batches they already finished without touching their data.

    ``data`` is a ``Dataset``, a ``(images, labels)`` pair, or a lone images
    array (then ``labels`` is None); images may be a ``StoredImages`` view.
    """
    if isinstance(data, Dataset):
        images, labels = data.images, data.labels
    elif isinstance(data, tuple) and len(data) == 2:
        images, labels = data
    else:
        images, labels = data, None
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
    total = num_batches(len(images), batch_size, drop_remainder)
    start = check_int(start, "start (a batch index)", 0)
    # a grain-decoded view streams all batches through one pipeline (decode workers run ahead)
    stream = (iter(images.iter_ranges([(start * batch_size, min(total * batch_size, len(images)))], batch_size))
              if hasattr(images, "iter_ranges") and start < total else None)
    for b in range(start, total):
        lo, hi = b * batch_size, min((b + 1) * batch_size, len(images))
        # a streaming data set reads just this batch (from disk, or decoded by the pipeline)
        x = read_rows(images[lo:hi]) if stream is None else unit_float(next(stream))
        y = None if labels is None else labels[lo:hi]
        n = hi - lo
        if pad and n < batch_size:
            x = _pad_rows(x, batch_size)
            y = None if y is None else _pad_rows(y, batch_size)
        yield Batch(x, y, n)
