"""uint8 images in a ``.npy`` file, read a row range at a time: inputs that stream.

A route job over a large data set should hold only the batch it is routing,
not the whole set.  :class:`StoredImages` stands where a ``Dataset`` keeps its
image array: slicing it gives another lazy view, and :func:`jaxroute.data.batches`
reads each batch from disk (``os.pread``, no memory map, so pages already
routed do not stay in the process's resident set) and converts it to float32
in [0, 1] then.  The ImageFolder cache writes this format
(``load_dataset(..., stream=True)``).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from jaxroute.utils.io import atomic_write_with

_CRC_CHUNK = 1 << 24  # bytes per read while checking a file's CRC


def unit_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 as float32 in [0, 1]: the one conversion every data source uses."""
    x = pixels.astype(np.float32)
    x /= np.float32(255.0)
    return x


def save_stored_images(path, images: np.ndarray) -> int:
    """Write uint8 (N, H, W, C) ``images`` as a ``.npy`` atomically; returns the CRC-32 of the pixel bytes."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"stored images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    atomic_write_with(path, lambda f: np.save(f, images, allow_pickle=False))
    return zlib.crc32(images.data)


class StoredImages:
    """A lazy, read-only (N, H, W, C) view of uint8 pixels in a ``.npy`` file.

    ``x[a:b]`` is another view (nothing is read); :meth:`read` returns the rows
    as float32 in [0, 1].  ``crc32`` (optional) is checked over the whole file
    when opened, in chunks, so a truncated or corrupted file fails here and
    not as wrong pixels in the middle of a job.
    """

    def __init__(self, path, crc32: int | None = None, *, _view=None):
        self.path = Path(path)
        if _view is not None:
            self._offset, self._full_shape, self._lo, self._hi = _view
            return
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self._offset = f.tell()
        except FileNotFoundError:
            raise FileNotFoundError(f"stored images {self.path} do not exist") from None
        except ValueError as e:
            raise ValueError(f"{self.path} is not a .npy file: {e}") from e
        if dtype != np.uint8 or len(shape) != 4 or fortran:
            raise ValueError(f"{self.path} must hold a C-order uint8 (N, H, W, C) array, got {dtype} {shape}"
                             f"{' (Fortran order)' if fortran else ''}")
        size = int(np.prod(shape))
        have = self.path.stat().st_size - self._offset
        if have != size:
            raise ValueError(f"{self.path} is truncated or padded: {have} pixel bytes, its header says {size}")
        if crc32 is not None:
            crc = 0
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                while chunk := f.read(_CRC_CHUNK):
                    crc = zlib.crc32(chunk, crc)
            if crc != crc32:
                raise ValueError(f"{self.path} is corrupted: CRC-32 {crc:#010x}, expected {crc32:#010x}")
        self._full_shape = tuple(int(d) for d in shape)
        self._lo, self._hi = 0, self._full_shape[0]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._hi - self._lo,) + self._full_shape[1:]

    ndim = 4
    dtype = np.dtype(np.float32)  # what reading yields

    def __len__(self) -> int:
        return self._hi - self._lo

    def __repr__(self) -> str:
        return f"StoredImages({str(self.path)!r}, rows {self._lo}:{self._hi} of {self._full_shape})"

    def __getitem__(self, idx) -> "StoredImages":
        if not isinstance(idx, slice):
            raise TypeError(f"StoredImages supports row slices x[a:b] (lazy) and .read(); got index {idx!r}. "
                            "Load the data set without stream=True for arbitrary indexing")
        lo, hi, step = idx.indices(len(self))
        if step != 1:
            raise ValueError(f"StoredImages slices must have step 1, got {step}")
        hi = max(lo, hi)
        return StoredImages(self.path, _view=(self._offset, self._full_shape, self._lo + lo, self._lo + hi))

    def read(self) -> np.ndarray:
        """The rows of this view as float32 (n, H, W, C) in [0, 1]."""
        return unit_float(self.read_uint8())

    def read_uint8(self) -> np.ndarray:
        """The rows of this view as stored: uint8 (n, H, W, C)."""
        row = int(np.prod(self._full_shape[1:]))
        n = len(self)
        buf = bytearray(n * row)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got, view = 0, memoryview(buf)
            while got < len(buf):
                k = os.preadv(fd, [view[got:]], self._offset + (self._lo * row) + got)
                if k == 0:
                    raise ValueError(f"{self.path} ended early reading rows {self._lo}:{self._hi}")
                got += k
        finally:
            os.close(fd)
        return np.frombuffer(buf, np.uint8).reshape(self.shape)


def read_rows(images) -> np.ndarray:
    """``images`` as an in-memory float32 array: a lazy view (``StoredImages``, ``StreamImages``) is read,
    an array passed through."""
    return images if isinstance(images, np.ndarray) or not hasattr(images, "read") else images.read()
