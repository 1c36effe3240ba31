"""A preprocessed split stored as ArrayRecord: repeated jobs read pixels, not JPEGs.

``jaxroute data convert`` decodes and preprocesses a split once
(:mod:`jaxroute.data.pipeline`) and writes, in ``DIR``::

    SPLIT.array_record    one record per image: its uint8 (H, W, C) pixels, raw
                          (``group_size:1``: any record is read without its neighbours)
    SPLIT.labels.npy      int32 labels, in record order
    SPLIT.records.json    shape, count, class names, the preprocessing, the files
                          left out (``--skip-bad``) and the source; written last,
                          it marks the split complete

``load_dataset(DIR, SPLIT)`` reads it back through grain's
``ArrayRecordDataSource`` as a streaming ``Dataset`` in the same order.  The
records hold raw pixels rather than tfds' serialized examples: reading them
needs neither TensorFlow's example protos nor an image decoder, and the
pixels are exactly what was routed-ready when converted.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from jaxroute.utils.io import atomic_write_text

from .core import Dataset

FORMAT = "jaxroute-records-v1"
_WRITE_BATCH = 64


def records_paths(root, split: str) -> tuple[Path, Path, Path]:
    root = Path(root)
    return root / f"{split}.array_record", root / f"{split}.labels.npy", root / f"{split}.records.json"


def is_records_split(root, split: str) -> bool:
    return records_paths(root, split)[2].is_file()


def write_records(dataset: Dataset, out, split: str, *, source: dict | None = None, progress: bool = True,
                  log=None) -> dict:
    """Write ``dataset`` (a streaming one: decoded as it is written) as the ArrayRecord split ``out/split``.

    Returns the metadata written (with ``images_per_s``, the input rate of the conversion).
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path, labels_path, meta_path = records_paths(out, split)
    if meta_path.exists():
        raise FileExistsError(f"{meta_path} exists: split {split!r} is already converted in {out}")
    images, n = dataset.images, len(dataset)
    shape = tuple(int(d) for d in images.shape[1:])
    tmp = data_path.with_name(data_path.name + ".partial")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    t0 = time.perf_counter()
    try:
        with tqdm(total=n, unit="img", desc=f"convert {split}", disable=not progress, file=sys.stderr) as bar:
            if hasattr(images, "iter_ranges"):
                parts = images.iter_ranges([(0, n)], _WRITE_BATCH)
            else:  # in-memory or cached pixels: already decoded
                parts = (_to_uint8(images[a:a + _WRITE_BATCH]) for a in range(0, n, _WRITE_BATCH))
            for x in parts:
                for img in x:
                    writer.write(np.ascontiguousarray(img).tobytes())
                bar.update(len(x))
                dt = time.perf_counter() - t0
                bar.set_postfix_str(f"input {bar.n / dt:.0f} img/s" if dt > 0 else "")
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    os.replace(tmp, data_path)
    np.save(labels_path, np.asarray(dataset.labels, np.int32))
    info = dict(dataset.info or {})
    meta = {"format": FORMAT, "split": split, "num_records": n, "shape": list(shape),
            "class_names": list(dataset.class_names), "preprocess": info.get("preprocess"),
            "skipped": info.get("skipped", []), "source": dict(source or {}),
            "records": data_path.name, "labels": labels_path.name}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    if log is not None:
        log(f"wrote {n} images {shape} to {data_path} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s)")
    return {**meta, "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else None}


def _to_uint8(x) -> np.ndarray:
    if hasattr(x, "read_uint8"):
        return x.read_uint8()
    x = np.asarray(x)
    return x if x.dtype == np.uint8 else np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def load_records(root, split: str, limit: int | None = None, *, workers: int | None = None) -> Dataset:
    """A converted split as a streaming ``Dataset`` (grain reads its ArrayRecord file)."""
    import grain

    from .pipeline import RawPixels, StreamImages

    data_path, labels_path, meta_path = records_paths(root, split)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path} is not a readable converted-split description: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    labels = np.load(labels_path, allow_pickle=False)
    source = grain.sources.ArrayRecordDataSource(str(data_path))
    if len(source) != meta["num_records"] or len(labels) != meta["num_records"]:
        raise ValueError(f"{root}: split {split!r} holds {len(source)} records and {len(labels)} labels, its "
                         f"description says {meta['num_records']} (an incomplete copy?)")
    images = StreamImages(source, RawPixels(meta["shape"]), meta["shape"], workers=workers)
    info = {"source": "records", "pipeline": "grain", "preprocess": meta.get("preprocess"),
            "skipped": meta.get("skipped", []), "converted_from": meta.get("source", {})}
    ds = Dataset(images, labels.astype(np.int32), tuple(meta["class_names"]), f"{Path(root).name}:{split}", info)
    return ds if limit is None else ds.take(min(limit, len(ds)))
