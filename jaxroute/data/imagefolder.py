"""Folders of JPEG/PNG files (``ROOT/<split>/<class>/*.jpg``), decoded once and cached.

Decoding 60,000 small JPEGs costs tens of seconds of Python/Pillow overhead on
every run; the decoded uint8 pixels are therefore cached per split, keyed by
everything that could change them (absolute root, split, file names, sizes and
mtimes), so a second load only reads an array from disk.  A cache entry is two
files: ``NAME.npy`` (the uint8 pixels, a plain ``.npy`` so that a streaming
load can read any row range of it, :class:`~jaxroute.data.stored.StoredImages`)
and ``NAME.npz`` (key, labels, class names and the pixels' CRC-32), written
second: it is the entry's commit mark.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxroute.utils.io import atomic_save_npz

from .core import Dataset
from .stored import StoredImages, save_stored_images, unit_float

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LAYOUT = "ROOT/<split>/<class>/*.jpg|*.jpeg|*.png"
# Bump when the decoded content for the same files would change (decoder
# settings, colour mode), so stale caches are ignored instead of trusted.
CACHE_FORMAT = 2  # 2: pixels in a separate .npy (streamable), CRC-32 in the .npz
_CHUNK = 256  # files per thread task: large enough to amortise scheduling


class FileEntry(NamedTuple):
    path: Path
    label: int
    size: int
    mtime_ns: int


def default_cache_dir() -> Path:
    """``$JAXROUTE_CACHE`` or ``~/.cache/jaxroute``."""
    env = os.environ.get("JAXROUTE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxroute"


def _layout_hint(root: Path) -> str:
    return f"expected the ImageFolder layout {LAYOUT} with ROOT={root}"


def list_split(root, split: str) -> tuple[tuple[str, ...], list[FileEntry]]:
    """Class names and the split's files in canonical (class-interleaved) order.

    Round robin over classes (file 0 of every class, then file 1, ...) so that
    any prefix, and hence any ``limit``, is class-balanced; classes with fewer
    files drop out of later rounds. Classes keep a label even when their folder
    is empty, so labels never shift between splits because one folder is bare.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist; {_layout_hint(root)}")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; {_layout_hint(root)}")
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(f"no split folder {split_dir} (split {split!r}); splits present: {have}; "
                                f"{_layout_hint(root)}")
    class_dirs = sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    if not class_dirs:
        raise ValueError(f"no class folders in {split_dir}; {_layout_hint(root)}")
    per_class: list[list[FileEntry]] = []
    for label, cdir in enumerate(class_dirs):
        entries = []
        with os.scandir(cdir) as it:
            for e in it:
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    st = e.stat()
                    entries.append(FileEntry(Path(e.path), label, st.st_size, st.st_mtime_ns))
        entries.sort(key=lambda f: f.path.name)
        per_class.append(entries)
    if not any(per_class):
        raise ValueError(f"no images ({', '.join('*' + x for x in IMAGE_EXTENSIONS)}) in the class folders of "
                         f"{split_dir}; {_layout_hint(root)}")
    order = [c[r] for r in range(max(map(len, per_class))) for c in per_class if r < len(c)]
    return tuple(p.name for p in class_dirs), order


def cache_key(root: Path, split: str, entries: list[FileEntry], preprocess=None) -> str:
    h = hashlib.sha256(f"imagefolder/{CACHE_FORMAT}\n{Path(root).absolute()}\n{split}\n".encode())
    if preprocess is not None:  # the decoded pixels depend on it; absent, the key is that of the raw pixels
        h.update(f"preprocess {sorted(preprocess.to_json().items())}\n".encode())
    for f in entries:
        h.update(f"{f.path.parent.name}/{f.path.name}\t{f.size}\t{f.mtime_ns}\n".encode())
    return h.hexdigest()


def cache_path(cache_dir: Path, root: Path, split: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(root).name) or "root"
    return Path(cache_dir) / "imagefolder" / f"{safe}-{split}-{key[:32]}.npz"


_FORMAT_HINT = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}


def _decode_one(path: Path, preprocess=None) -> np.ndarray:
    """One image as uint8 (H, W, 3), or as ``preprocess`` makes it (:mod:`jaxroute.data.preprocess`).

    Per-image Python overhead, not pixel decoding, dominates for small images;
    the format hint (skip Pillow's format sniffing) and ``tobytes`` (instead of
    ``np.asarray``'s array-interface path) cut it by about a third.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path, formats=_FORMAT_HINT.get(Path(path).suffix.lower()))
    except UnidentifiedImageError:
        im = Image.open(path)  # misnamed file: let Pillow sniff the format
    with im:
        if preprocess is not None:
            return preprocess(im)
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        return np.frombuffer(rgb.tobytes(), np.uint8).reshape(rgb.height, rgb.width, 3)


def _decode_into(out: np.ndarray, entries: list[FileEntry], lo: int, hi: int, ref: Path, preprocess=None) -> int:
    for i in range(lo, hi):
        path = entries[i].path
        try:
            img = _decode_one(path, preprocess)
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"cannot decode image {path}: {e}") from e
        if img.shape != out.shape[1:]:
            raise ValueError(f"image {path} has size {img.shape[1]}x{img.shape[0]} (WxH) but {ref} has "
                             f"{out.shape[2]}x{out.shape[1]}; all images of an ImageFolder split must share "
                             "one size (resize them first)")
        out[i] = img
    return hi - lo


def decode_files(entries: list[FileEntry], desc: str = "decoding", max_workers: int | None = None,
                 preprocess=None) -> np.ndarray:
    """Decode to one uint8 (N, H, W, 3) array with a thread pool.

    Threads, not processes: Pillow releases the GIL while decoding and writing
    straight into one preallocated array avoids pickling pixels back.
    """
    from tqdm import tqdm

    try:
        first = _decode_one(entries[0].path, preprocess)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot decode image {entries[0].path}: {e}") from e
    out = np.empty((len(entries),) + first.shape, np.uint8)
    out[0] = first
    workers = max_workers or min(16, (os.cpu_count() or 1) + 2)
    with tqdm(total=len(entries), desc=desc, unit="img", file=sys.stderr, disable=None, leave=False) as bar, \
            cf.ThreadPoolExecutor(workers) as pool:
        bar.update(1)
        futs = [pool.submit(_decode_into, out, entries, lo, min(lo + _CHUNK, len(entries)), entries[0].path,
                            preprocess)
                for lo in range(1, len(entries), _CHUNK)]
        try:
            for fut in cf.as_completed(futs):
                bar.update(fut.result())
        except BaseException:
            for fut in futs:
                fut.cancel()
            raise
    return out


def _pixels_path(meta: Path) -> Path:
    return meta.with_suffix(".npy")


def _read_cache(path: Path, key: str, entries: list[FileEntry],
                class_names: tuple[str, ...]) -> StoredImages | None:
    """The cached pixels as a lazy view, or None when absent, stale or unreadable.

    The pixel file's size is checked against its header and its CRC-32
    against the one recorded when it was written, so a truncated or
    bit-flipped cache is rebuilt rather than used.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ok = (str(z["key"]) == key and tuple(str(c) for c in z["class_names"]) == class_names
                  and np.array_equal(z["labels"], [e.label for e in entries]))
            crc = int(z["crc32"])
        if ok:
            stored = StoredImages(_pixels_path(path), crc32=crc)
            if len(stored) == len(entries):
                return stored
        warnings.warn(f"ImageFolder cache {path} does not match the files; rebuilding it", RuntimeWarning, 2)
    except Exception as e:  # any failure to read means: decode again
        warnings.warn(f"ImageFolder cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it",
                      RuntimeWarning, 2)
    return None


def _write_cache(path: Path, images: np.ndarray, key: str, entries: list[FileEntry],
                 class_names: tuple[str, ...]) -> StoredImages | None:
    """Pixels, then metadata, each atomic (:mod:`jaxroute.utils.io`): a reader sees a whole
    entry or none.  Returns the written pixels as a lazy view (None if the cache dir is unwritable)."""
    try:
        crc = save_stored_images(_pixels_path(path), images)
        atomic_save_npz(path, labels=np.asarray([e.label for e in entries], np.int32),
                        class_names=np.asarray(class_names, dtype=str), key=np.asarray(key),
                        crc32=np.asarray(crc, np.int64))
        return StoredImages(_pixels_path(path))
    except OSError as e:  # a read-only or full cache dir must not stop the load
        warnings.warn(f"could not write ImageFolder cache {path}: {e}", RuntimeWarning, 2)
        return None


def _lookup(root: Path, split: str, entries, limit, cache_dir: Path, class_names, preprocess):
    """(pixels view, entries, key, path) of a cache entry for these files: the whole split's
    (sliced to ``limit``) if present, else the ``limit`` prefix's; pixels None when absent."""
    full_key = cache_key(root, split, entries, preprocess)
    full_path = cache_path(cache_dir, root, split, full_key)
    pixels = _read_cache(full_path, full_key, entries, class_names)
    if pixels is not None:
        if limit is not None:
            pixels, entries = pixels[:limit], entries[:limit]
        return pixels, entries, full_key, full_path
    if limit is not None and limit < len(entries):
        entries = entries[:limit]
        key = cache_key(root, split, entries, preprocess)
        path = cache_path(cache_dir, root, split, key)
        return _read_cache(path, key, entries, class_names), entries, key, path
    return None, entries, full_key, full_path


def _load(root, split, limit, cache_dir, use_cache, preprocess=None):
    """(pixels, entries, class_names): pixels a StoredImages view of the cache, or a uint8 array
    when there is no (writable) cache."""
    root = Path(root).expanduser().absolute()
    class_names, entries = list_split(root, split)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if use_cache and preprocess is not None and preprocess.channels == 3 and preprocess.resize == preprocess.crop:
        # Images already at the crop size pass this transform unchanged: a cache of the raw pixels
        # of that size serves (folders cached before preprocessing existed are not decoded again).
        raw, raw_entries, _, _ = _lookup(root, split, entries, limit, cache_dir, class_names, None)
        if raw is not None and raw.shape[1:] == preprocess.output_shape:
            return raw, raw_entries, class_names
    if use_cache:
        pixels, entries, key, path = _lookup(root, split, entries, limit, cache_dir, class_names, preprocess)
    else:
        entries = entries if limit is None else entries[:limit]
        pixels, key, path = None, None, None
    if pixels is None:
        decoded = decode_files(entries, desc=f"decoding {root.name}/{split}", preprocess=preprocess)
        pixels = (_write_cache(path, decoded, key, entries, class_names) if use_cache else None)
        if pixels is None:
            pixels = decoded
    return pixels, entries, class_names


def load_imagefolder_uint8(root, split: str = "test", limit: int | None = None, cache_dir=None,
                           use_cache: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """uint8 images, int32 labels and class names of one split (canonical order).

    With ``limit``, a cache of the whole split is sliced when it exists;
    otherwise only the first ``limit`` files are decoded (and cached on their
    own), so small evaluation runs never pay for the full split.
    """
    pixels, entries, class_names = _load(root, split, limit, cache_dir, use_cache)
    images = pixels.read_uint8() if isinstance(pixels, StoredImages) else pixels
    labels = np.fromiter((e.label for e in entries), np.int32, len(entries))
    return images, labels, class_names


def load_imagefolder(root, split: str = "test", limit: int | None = None, cache_dir=None,
                     use_cache: bool = True, stream: bool = False, preprocess=None) -> Dataset:
    """One split as a ``Dataset``; ``stream=True`` leaves the pixels in the cache file and reads
    them batch by batch (:class:`~jaxroute.data.stored.StoredImages`), so memory does not grow
    with the number of images.  Without a writable cache a streaming load warns and holds the
    images in memory.  ``preprocess`` (a :class:`~jaxroute.data.preprocess.Preprocess`) is applied
    while decoding, so images of any sizes give one size; it is part of the cache key."""
    pixels, entries, class_names = _load(root, split, limit, cache_dir, use_cache, preprocess)
    labels = np.fromiter((e.label for e in entries), np.int32, len(entries))
    if isinstance(pixels, StoredImages):
        images = pixels if stream else pixels.read()
    else:
        if stream:
            warnings.warn(f"stream=True needs the ImageFolder cache (use_cache=False or an unwritable cache "
                          f"dir); holding the {len(pixels)} images of {root} in memory", RuntimeWarning, 2)
        images = unit_float(pixels)
    info = None if preprocess is None else {"source": "imagefolder", "pipeline": "decoded cache",
                                            "preprocess": preprocess.to_json(), "skipped": []}
    return Dataset(images, labels, class_names, f"{Path(root).name}:{split}", info)


def stream_imagefolder(root, split: str, preprocess, limit: int | None = None, *, skip_bad: bool = False,
                       workers: int | None = None) -> Dataset:
    """One split decoded per file by a grain pipeline (:mod:`jaxroute.data.pipeline`): images of any
    sizes and modes (RGB, grayscale, palette; JPEG or PNG) go through ``preprocess`` in decode workers.

    A file that does not decode stops the stream with one line naming it.  ``skip_bad=True`` first
    decodes every file once (on the same workers, keeping nothing) and leaves the bad ones out of the
    split; they are listed in ``Dataset.info["skipped"]`` (which the extraction manifest records).
    ``limit`` takes the first ``limit`` files before bad ones are left out.
    """
    from .pipeline import DecodeFile, StreamImages, find_bad_records

    root = Path(root).expanduser().absolute()
    class_names, entries = list_split(root, split)
    if limit is not None:
        entries = entries[:limit]
    transform = DecodeFile(preprocess)
    skipped = []
    if skip_bad:
        bad = dict(find_bad_records([str(e.path) for e in entries], transform, workers=workers))
        skipped = [{"file": os.path.relpath(entries[i].path, root), "error": msg} for i, msg in sorted(bad.items())]
        entries = [e for i, e in enumerate(entries) if i not in bad]
        if not entries:
            raise ValueError(f"no image of {root / split} decodes ({len(bad)} bad files)")
    images = StreamImages([str(e.path) for e in entries], transform, preprocess.output_shape, workers=workers)
    labels = np.fromiter((e.label for e in entries), np.int32, len(entries))
    info = {"source": "imagefolder", "pipeline": "grain", "preprocess": preprocess.to_json(), "skipped": skipped}
    return Dataset(images, labels, class_names, f"{root.name}:{split}", info)
