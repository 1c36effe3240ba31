"""Atomic writes: readers see the old file or the new one, with the usual file mode."""
import os
import stat

import numpy as np
import pytest

from jaxroute.utils.io import atomic_save_npz, atomic_write_text


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        atomic_save_npz(tmp_path / "b.npz", x=np.arange(3))
    finally:
        os.umask(old)
    for name in ("a.json", "b.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "s.npz"
    atomic_save_npz(target, x=np.arange(3))

    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save_npz(target, x=Boom())
    with np.load(target) as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_creates_parent_folders_and_round_trips(tmp_path):
    atomic_save_npz(tmp_path / "a" / "b" / "c.npz", cdrp=np.ones((2, 5), np.float32))
    with np.load(tmp_path / "a" / "b" / "c.npz") as z:
        assert z["cdrp"].shape == (2, 5)
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text() == "héllo"


def test_check_writable_dir(tmp_path):
    from jaxroute.utils.io import check_writable_dir

    out = check_writable_dir(tmp_path / "a" / "b")                 # created, parents too
    assert out == tmp_path / "a" / "b" and out.is_dir() and list(out.iterdir()) == []   # no probe left behind
    assert check_writable_dir(out) == out                            # an existing folder is fine
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_writable_dir(f)
    with pytest.raises(ValueError, match="cannot write to the output directory"):
        check_writable_dir(f / "sub")                               # under a file: cannot be created
