"""Images decoded per record by a grain pipeline: large and variable-size collections that stream.

:class:`StreamImages` stands where a ``Dataset`` keeps its image array, like
:class:`~jaxroute.data.stored.StoredImages`, but its rows are *records* of a
random-access source (file paths of an ImageFolder, a tfds ``data_source``,
an ArrayRecord file written by :func:`jaxroute.data.records.write_records`)
turned into uint8 pixels by a picklable transform (decode + the model's
:class:`~jaxroute.data.preprocess.Preprocess`).  Nothing is decoded up front.

The pipeline is grain's (``MapDataset`` -> ``IterDataset`` -> ``mp_prefetch``):

* one grain element is one whole batch of rows, so a decode worker returns
  one array per batch (one transfer through shared memory, not one per image).
  grain 0.2.18 leaves one segment per pipeline to Python's resource tracker,
  which removes it at exit with a "leaked shared_memory objects" warning;
  passing batches pickled instead silences it but measured 15-23% slower
  decode to 224 x 224 (1 and 2 workers) and a less flat job RSS;
* ``workers > 0`` decode in that many worker processes (grain's
  multiprocessing prefetch); ``workers = 0`` decodes on ``threads`` threads of
  this process (Pillow releases the GIL while decoding and resizing);
* the order is deterministic: grain hands batch k to worker ``k % workers``
  and yields them in order, whatever the worker count;
* a bounded number of batches is in flight (``prefetch`` per worker), so
  memory is flat in the number of images.

Each ``jax.distributed`` process reads only its own rows: the extraction job
asks for the row ranges of its own shards (:meth:`StreamImages.iter_ranges`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from jaxroute.utils.checks import check_int

from .stored import unit_float

DEFAULT_READ_BATCH = 64  # rows per grain element when the caller has no batch size of its own


def default_workers() -> int:
    """Decode worker processes by default: one per core but one (which runs the routing), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class DecodeFile:
    """Transform: an image file path -> uint8 pixels after ``preprocess`` (picklable for decode workers)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, path: str) -> np.ndarray:
        from .imagefolder import _decode_one

        try:
            return _decode_one(Path(path), self.preprocess)
        except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"cannot decode image {path}: {e}") from None


class DecodeBytes:
    """Transform: a tfds example whose image feature is still encoded (``SkipDecoding``) -> preprocessed pixels."""

    def __init__(self, key: str, preprocess, name: str):
        self.key, self.preprocess, self.name = key, preprocess, name

    def __call__(self, example) -> np.ndarray:
        import io

        from PIL import Image

        data = example[self.key]
        try:
            if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim >= 2:
                return self.preprocess(data)  # a decoded image (tfds Tensor feature)
            with Image.open(io.BytesIO(bytes(data))) as im:
                return self.preprocess(im)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"cannot decode an image of {self.name}: {e}") from None


class RawPixels:
    """Transform: the raw bytes of one record of a converted split -> uint8 (H, W, C)."""

    def __init__(self, shape):
        self.shape = tuple(int(d) for d in shape)

    def __call__(self, record: bytes) -> np.ndarray:
        a = np.frombuffer(record, np.uint8)
        if a.size != int(np.prod(self.shape)):
            raise ValueError(f"a record holds {a.size} bytes, the split's images are {self.shape}")
        return a.reshape(self.shape)


class _LoadBatch:
    """Grain map: a batch of row numbers -> uint8 (n, H, W, C); runs in the decode workers."""

    def __init__(self, source, transform: Callable, shape):
        self.source, self.transform, self.shape = source, transform, tuple(shape)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows),) + self.shape, np.uint8)
        for k, r in enumerate(rows):
            img = self.transform(self.source[int(r)])
            if img.shape != self.shape:
                raise ValueError(f"record {int(r)} decodes to shape {img.shape}, the split's images are {self.shape}")
            out[k] = img
        return out


class _CheckBatch:
    """Grain map: a batch of row numbers -> [(row, error message)] of the rows that do not decode."""

    def __init__(self, source, transform: Callable):
        self.source, self.transform = source, transform

    def __call__(self, rows: np.ndarray) -> list:
        bad = []
        for r in rows:
            try:
                self.transform(self.source[int(r)])
            except ValueError as e:
                bad.append((int(r), str(e)))
        return bad


def _grain_iter(elements: Sequence, fn: Callable, workers: int, threads: int, prefetch: int) -> Iterator:
    """``fn(e)`` for every element, in order, computed ahead by grain (worker processes or threads)."""
    import grain

    ds = grain.MapDataset.source(list(elements)).map(fn)
    if workers > 0:
        from absl import flags

        # grain 0.2.18 reads one of its absl flags when it starts workers without checking that flags
        # were parsed, which only programs run through absl.app do; with nothing to parse, marking
        # them parsed keeps every flag at its default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # each worker decodes one batch at a time; parallelism comes from the processes
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    else:
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads + prefetch))
    return iter(it)


def _row_batches(ranges, batch_size: int) -> list[np.ndarray]:
    return [np.arange(a, min(a + batch_size, hi), dtype=np.int64) for lo, hi in ranges for a in range(lo, hi, batch_size)]


class StreamImages:
    """A lazy (N, H, W, C) view of images decoded per record by grain; reads as float32 in [0, 1].

    ``source`` has ``len`` and ``source[i]`` (records); ``transform(record)``
    gives uint8 (H, W, C) = ``shape``.  ``x[a:b]`` is another view (nothing is
    decoded); :meth:`iter_ranges` streams row ranges batch by batch; :meth:`read`
    decodes the whole view.  ``workers``/``threads``/``prefetch`` configure the
    decoding only, never the pixels.
    """

    ndim = 4
    dtype = np.dtype(np.float32)  # what reading yields

    def __init__(self, source, transform: Callable, shape, *, workers: int | None = None, threads: int = 4,
                 prefetch: int = 2, _rows: tuple[int, int] | None = None):
        self.source, self.transform = source, transform
        self.image_shape = tuple(int(d) for d in shape)
        self.workers = default_workers() if workers is None else check_int(workers, "workers", 0)
        self.threads = check_int(threads, "threads")
        self.prefetch = check_int(prefetch, "prefetch")
        self._lo, self._hi = _rows if _rows is not None else (0, len(source))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._hi - self._lo,) + self.image_shape

    def __len__(self) -> int:
        return self._hi - self._lo

    def __repr__(self) -> str:
        return (f"StreamImages({type(self.source).__name__}, rows {self._lo}:{self._hi}, {self.image_shape}, "
                f"workers={self.workers})")

    def __getitem__(self, idx) -> "StreamImages":
        if not isinstance(idx, slice):
            raise TypeError(f"StreamImages supports row slices x[a:b] (lazy) and .read(); got index {idx!r}. "
                            "Load the data set without stream=True for arbitrary indexing")
        lo, hi, step = idx.indices(len(self))
        if step != 1:
            raise ValueError(f"StreamImages slices must have step 1, got {step}")
        return StreamImages(self.source, self.transform, self.image_shape, workers=self.workers,
                            threads=self.threads, prefetch=self.prefetch,
                            _rows=(self._lo + lo, self._lo + max(lo, hi)))

    def with_workers(self, workers: int) -> "StreamImages":
        return StreamImages(self.source, self.transform, self.image_shape, workers=workers, threads=self.threads,
                            prefetch=self.prefetch, _rows=(self._lo, self._hi))

    def iter_ranges(self, ranges, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches of the view's rows ``[lo, hi)`` for each range, in order; no batch spans two
        ranges (each range ends with its own partial batch), so a caller can cut the stream per range."""
        batch_size = check_int(batch_size, "batch_size")
        spans = []
        for lo, hi in ranges:
            if not 0 <= lo <= hi <= len(self):
                raise ValueError(f"row range {lo}:{hi} is outside this view of {len(self)} images")
            spans.append((self._lo + lo, self._lo + hi))
        rows = _row_batches(spans, batch_size)
        if not rows:
            return iter(())
        return _grain_iter(rows, _LoadBatch(self.source, self.transform, self.image_shape), self.workers,
                           self.threads, self.prefetch)

    def read_uint8(self) -> np.ndarray:
        """The rows of this view decoded: uint8 (n, H, W, C)."""
        parts = list(self.iter_ranges([(0, len(self))], DEFAULT_READ_BATCH))
        return np.concatenate(parts) if parts else np.empty(self.shape, np.uint8)

    def read(self) -> np.ndarray:
        """The rows of this view as float32 (n, H, W, C) in [0, 1]."""
        return unit_float(self.read_uint8())


def find_bad_records(source, transform: Callable, *, workers: int | None = None, threads: int = 4,
                     batch_size: int = DEFAULT_READ_BATCH) -> list[tuple[int, str]]:
    """``[(row, message)]`` of the records ``transform`` cannot decode: one decode pass over the
    source on the same grain workers as a job, with nothing kept."""
    workers = default_workers() if workers is None else check_int(workers, "workers", 0)
    rows = _row_batches([(0, len(source))], batch_size)
    bad: list[tuple[int, str]] = []
    if rows:
        for part in _grain_iter(rows, _CheckBatch(source, transform), workers, threads, 2):
            bad.extend(part)
    return bad
