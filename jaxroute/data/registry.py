"""``load_dataset``: one string names any supported source.

A single spec string keeps command lines and experiment configs uniform
(``--data digits``, ``--data ../shared/data/cifar10-jpeg``, ``--data tfds:mnist``)
while each source keeps its own loader module.
"""
from __future__ import annotations

import os
from pathlib import Path

from jaxroute.utils.checks import check_int

from .arrays import arrays_split_path, load_arrays_split
from .core import Dataset

TFDS_PREFIX = "tfds:"
SPEC_HELP = ("'digits' (scikit-learn 8x8 digits), 'tfds:NAME' (tfds syntax: 'mnist', 'cifar10:3.0.2', "
             "'name/config:version'), or the path of a folder: ImageFolder layout ROOT/<split>/<class>/*.jpg|png, "
             "or CIFAR-10 python batches (a folder with batches.meta), or a folder with SPLIT.npz arrays "
             "(images, labels[, class_names]), as `jaxroute attack` writes")


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or Path(spec).exists()


# Model inputs up to this size keep the decoded-array cache (CIFAR, digits: small and fixed);
# larger ones (224 x 224 ImageNet inputs) are decoded per record by grain as they are routed.
CACHE_MAX_SIDE = 64


def load_dataset(spec: str, split: str = "test", limit: int | None = None, cache_dir=None,
                 download: bool = False, *, data_dir=None, stream: bool = False, preprocess=None,
                 skip_bad: bool = False, workers: int | None = None) -> Dataset:
    """Load ``split`` of the data set named by ``spec`` as a ``Dataset``.

    ``limit`` keeps the first ``limit`` samples of the source's canonical order
    (class-interleaved for ImageFolders, so prefixes are balanced).
    ``cache_dir`` is where decoded ImageFolders are cached (default
    ``$JAXROUTE_CACHE`` or ``~/.cache/jaxroute``) and, for ``tfds:`` specs, the
    tfds data dir (default ``$TFDS_DATA_DIR`` or tfds' own); ``data_dir`` is an
    alias for the latter that reads better in tfds code. ``download`` applies to
    tfds only and is off so that an unprepared data set fails at once.
    ``stream=True`` leaves an ImageFolder's decoded pixels on disk and reads
    them per batch (``Dataset.streams``); the other sources are small enough
    for memory and ignore it.

    ``preprocess`` (:class:`~jaxroute.data.preprocess.Preprocess`, usually
    the model card's, :func:`~jaxroute.data.preprocess.preprocess_for`) makes
    images of any size fit a model; it applies to ImageFolders and tfds.  An
    ImageFolder whose preprocessed images are at most ``CACHE_MAX_SIDE`` pixels
    (CIFAR, digits) is decoded once into the cache; larger ones, and any
    ``skip_bad`` load, are decoded per record by grain with ``workers`` decode
    processes (:mod:`jaxroute.data.pipeline`).  ``skip_bad`` leaves out files
    that do not decode (listed in ``Dataset.info``) instead of failing.  A
    folder converted by ``jaxroute data convert`` (``SPLIT.records.json``) is
    read as it was converted.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}; expected {SPEC_HELP}")
    spec = os.fspath(spec)
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    if limit is not None:
        limit = check_int(limit, "limit")
    if skip_bad and preprocess is None:
        raise ValueError("skip_bad needs preprocess: files are checked by the per-record decode pipeline")
    if data_dir is not None:
        if not spec.startswith(TFDS_PREFIX):
            raise ValueError(f"data_dir applies to 'tfds:' specs only (got spec {spec!r}); use cache_dir")
        if cache_dir is not None and Path(cache_dir) != Path(data_dir):
            raise ValueError(f"cache_dir={cache_dir!r} and data_dir={data_dir!r} disagree; pass one of them")
        cache_dir = data_dir

    if spec == "digits":
        from .digits import load_digits_dataset

        return load_digits_dataset(split, limit)
    if spec.startswith(TFDS_PREFIX):
        from .tfds_source import load_tfds

        name = spec[len(TFDS_PREFIX):]
        if not name:
            raise ValueError(f"empty tfds dataset name in spec {spec!r}; expected 'tfds:NAME'")
        if preprocess is not None:
            from .tfds_source import stream_tfds

            ds = stream_tfds(name, split, preprocess, limit, data_dir=cache_dir, download=download,
                             workers=workers)
            return ds if stream else ds.materialize()
        return load_tfds(name, split, limit, data_dir=cache_dir, download=download)
    if not _looks_like_path(spec):
        raise ValueError(f"unknown dataset spec {spec!r}: not a known name and no such folder; expected {SPEC_HELP}")
    root = Path(spec).expanduser()
    from .records import is_records_split, load_records

    if is_records_split(root, split):
        ds = load_records(root, split, limit, workers=workers)
        return ds if stream else ds.materialize()
    if arrays_split_path(root, split).is_file():
        return load_arrays_split(arrays_split_path(root, split), limit)
    from .cifar_pickle import is_cifar_pickle_dir, load_cifar_pickle

    if is_cifar_pickle_dir(root):
        return load_cifar_pickle(root, split, limit)
    from .imagefolder import load_imagefolder, stream_imagefolder

    if preprocess is not None and (skip_bad or preprocess.crop > CACHE_MAX_SIDE):
        ds = stream_imagefolder(root, split, preprocess, limit, skip_bad=skip_bad, workers=workers)
        return ds if stream else ds.materialize()
    return load_imagefolder(root, split, limit, cache_dir=cache_dir, stream=stream, preprocess=preprocess)
