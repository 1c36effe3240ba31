"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

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
