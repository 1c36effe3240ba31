"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, uniquely named file beside ``path``, created with mode 0666 & ~umask.

    Not ``tempfile.mkstemp``: it makes files 0600, and every shard and report would end up
    unreadable to other users of a shared folder; reading the umask to fix that afterwards
    means setting it, which races with other threads.  ``os.open`` lets the kernel apply it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_with(path, write) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_npz(path, **arrays) -> None:
    atomic_write_with(path, lambda f: np.savez(f, **arrays))


def jsonable(o):
    """``json.dumps`` ``default``: numpy scalars and arrays as plain numbers and lists."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON (numpy values allowed, see :func:`jsonable`)."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=jsonable))


def compact_png(path, colors: int = 256) -> None:
    """Re-save a PNG with an adaptive palette of ``colors`` colours, in place and atomically.

    Plots and small photos survive a 256-colour median-cut palette unchanged to the eye
    and the file shrinks 3-4x, which matters for figures kept under version control.
    """
    import io

    from PIL import Image

    with Image.open(path) as im:
        q = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    q.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())


def check_writable_dir(path) -> Path:
    """Create directory ``path`` if needed and check a file can be written there; ValueError otherwise.

    Jobs call it before any work, so an unwritable output fails in a moment,
    not after an hour of computing.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path / "write-check")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"cannot write to the output directory {path}: {e.strerror or e}") from None
    return path
