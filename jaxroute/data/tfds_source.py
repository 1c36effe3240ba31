"""TensorFlow Datasets read through tfds' TF-free path (array_record + numpy).

``tfds.data_source`` gives random access to array_record files and decodes
images with Pillow, so reading needs no TensorFlow. Preparing is another
matter: tfds encodes *numpy* images with ``tf.image.encode_png``, so most
stock image builders (mnist, cifar10, ...) need TensorFlow to be built.
Builders that yield PIL images, file paths or encoded bytes do not; that is
what ``prepare_imagefolder_tfds`` relies on to turn an ImageFolder into a
tfds data set offline and without TensorFlow.

``download=False`` is the default so an offline machine fails at once with a
message saying what to prepare where, instead of hanging in a download.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from .core import Dataset
from .stored import unit_float

ARRAY_RECORD = "array_record"
_CHUNK = 1024


def resolve_data_dir(data_dir=None) -> str | None:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else None (tfds' own default, ~/tensorflow_datasets)."""
    if data_dir is not None:
        return os.fspath(Path(data_dir).expanduser())
    env = os.environ.get("TFDS_DATA_DIR")
    return os.fspath(Path(env).expanduser()) if env else None


def _how_to_prepare(name: str, where) -> str:
    return (f"Prepare it in array_record format first: on a machine with network access (and TensorFlow "
            f"for builders that yield numpy images) run `tfds build {name} --file_format=array_record "
            f"--data_dir {where}` and copy that folder here, or call load_dataset('tfds:{name}', ..., "
            f"download=True); for your own ImageFolder use jaxroute.data.prepare_imagefolder_tfds (no TensorFlow "
            f"needed). The data dir is the cache_dir/data_dir argument, else $TFDS_DATA_DIR, else tfds' default.")


def _pick_keys(info) -> tuple[str, str]:
    sk = info.supervised_keys
    if isinstance(sk, tuple) and len(sk) == 2 and all(isinstance(k, str) for k in sk):
        return sk
    feats = info.features
    if "image" in feats and "label" in feats:
        return "image", "label"
    raise ValueError(f"tfds dataset {info.full_name!r} has no (image, label) supervised keys and no 'image'/'label' "
                     f"features; features are {list(feats)}")


def load_tfds(name: str, split: str = "test", limit: int | None = None, data_dir=None,
              download: bool = False) -> Dataset:
    """Load ``name`` (tfds syntax: ``mnist``, ``cifar10:3.0.2``, ``ds/config:1.0.0``) as a Dataset."""
    source, info = _open_source(name, split, data_dir, download)
    return _to_dataset(source, info, name, split, limit)


def _open_source(name: str, split: str, data_dir, download: bool, decoders=None):
    """(tfds ``data_source``, dataset info) with one-line errors for what is not prepared."""
    import tensorflow_datasets as tfds

    data_dir = resolve_data_dir(data_dir)
    builder_kwargs = {"file_format": ARRAY_RECORD}
    try:
        builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        where = data_dir or "tfds' default data dir"
        raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where} and is not a dataset this tfds "
                                f"knows how to build. {_how_to_prepare(name, where)}") from e
    where = data_dir or os.fspath(getattr(builder, "_data_dir_root", builder.data_dir))
    if not download and not builder.is_prepared():
        raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in data_dir {where} (no "
                                f"{builder.data_dir}/dataset_info.json) and download=False. "
                                f"{_how_to_prepare(name, where)}")
    if builder.is_prepared() and re.fullmatch(r"[\w-]+", split) and split not in builder.info.splits:
        raise ValueError(f"unknown split {split!r} for tfds dataset {name!r}; splits are "
                         f"{sorted(builder.info.splits)}")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                  builder_kwargs=builder_kwargs, decoders=decoders)
    except ModuleNotFoundError as e:  # only reachable when download=True and the data must be built
        if "tensorflow" in str(e):
            why = ("TensorFlow (its builder yields numpy images, which tfds encodes with tf.image); jaxroute "
                   "reads tfds without TensorFlow and does not install it")
        else:
            why = (f"the Python package {e.name or str(e)!r}, which is not installed (tfds 4.9.x imports "
                   "importlib_resources when building although it declares it only for Python < 3.9)")
        raise RuntimeError(f"preparing tfds dataset {name!r} needs {why}. {_how_to_prepare(name, where)}") from e
    except (NotImplementedError, RuntimeError) as e:
        raise ValueError(f"tfds dataset {name!r} in {where} is not readable as array_record ({e}). "
                         f"{_how_to_prepare(name, where)}") from e
    info = builder.info if builder.is_prepared() else tfds.builder(name, data_dir=data_dir, **builder_kwargs).info
    return source, info


def stream_tfds(name: str, split: str, preprocess, limit: int | None = None, data_dir=None,
                download: bool = False, workers: int | None = None) -> Dataset:
    """A tfds split decoded per record by grain (:mod:`jaxroute.data.pipeline`), images of any size
    through ``preprocess``.  The image feature is read still encoded (``SkipDecoding``) so that the
    labels can be read up front without decoding, and the decode workers decode each image once."""
    import tensorflow_datasets as tfds

    from .pipeline import DecodeBytes, StreamImages

    _, info = _open_source(name, split, data_dir, download)
    img_key, lbl_key = _pick_keys(info)
    skip = isinstance(info.features[img_key], tfds.features.Image)
    source, _ = _open_source(name, split, data_dir, download,
                             decoders={img_key: tfds.decode.SkipDecoding()} if skip else None)
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise ValueError(f"tfds dataset {name!r} split {split!r} is empty")
    labels = np.fromiter((int(source[i][lbl_key]) for i in range(n)), np.int32, n)
    label_feat = info.features[lbl_key]
    class_names = (tuple(label_feat.names) if isinstance(label_feat, tfds.features.ClassLabel)
                   else tuple(str(i) for i in range(int(labels.max()) + 1)))
    images = StreamImages(source, DecodeBytes(img_key, preprocess, f"tfds:{name}/{split}"),
                          preprocess.output_shape, workers=workers)[:n]
    info_d = {"source": "tfds", "pipeline": "grain", "preprocess": preprocess.to_json(), "skipped": []}
    return Dataset(images, labels, class_names, f"tfds:{name}:{split}", info_d)


def _to_dataset(source, info, name: str, split: str, limit: int | None) -> Dataset:
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    img_key, lbl_key = _pick_keys(info)
    label_feat = info.features[lbl_key]
    n = len(source) if limit is None else min(limit, len(source))
    if n == 0:
        raise ValueError(f"tfds dataset {name!r} split {split!r} is empty")
    images, labels = [], []
    with tqdm(total=n, desc=f"reading tfds:{name}/{split}", unit="img", file=sys.stderr, disable=None,
              leave=False) as bar:
        for lo in range(0, n, _CHUNK):
            for ex in source.__getitems__(list(range(lo, min(lo + _CHUNK, n)))):
                images.append(np.asarray(ex[img_key]))
                labels.append(int(ex[lbl_key]))
            bar.update(min(_CHUNK, n - lo))
    shape, dtype = images[0].shape, images[0].dtype
    for i, im in enumerate(images):
        if im.shape != shape:
            raise ValueError(f"tfds:{name}/{split} example {i} has image shape {im.shape} but example 0 has "
                             f"{shape}; a Dataset needs one image size")
    if dtype != np.uint8:
        raise ValueError(f"tfds:{name} images are {dtype}; only uint8 images are supported")
    x = np.stack(images)
    if x.ndim == 3:
        x = x[..., None]
    x = unit_float(x)
    if isinstance(label_feat, tfds.features.ClassLabel):
        class_names = tuple(label_feat.names)
    else:
        class_names = tuple(str(i) for i in range(max(labels) + 1))
    return Dataset(x, np.asarray(labels, np.int32), class_names, f"tfds:{name}:{split}")


_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


def prepare_imagefolder_tfds(root, data_dir, name: str, *, splits=None, version: str = "1.0.0") -> Path:
    """Build an ImageFolder into a tfds array_record data set, offline, without TensorFlow.

    Useful to hand an image folder to any tfds/grain consumer, and to test the
    tfds path without network. Images are decoded as in ``load_dataset`` (Pillow,
    RGB) and stored as PNG, so ``load_dataset(f"tfds:{name}", data_dir=...)``
    returns pixel-identical arrays in the same class-interleaved order
    (shuffling is disabled). Each example also keeps its ``file_name``.
    An already prepared ``name``/``version`` in ``data_dir`` is reused as is.
    Returns the prepared version folder.
    """
    import tensorflow_datasets as tfds
    from PIL import Image

    from .imagefolder import _decode_one, list_split

    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"tfds dataset name must match {_NAME_RE.pattern} (snake_case), got {name!r}")
    root = Path(root).expanduser().absolute()
    if splits is None:
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    listed = {s: list_split(root, s) for s in splits}
    if not listed:
        raise ValueError(f"no split folders in {root}")
    class_names = next(iter(listed.values()))[0]
    for s, (names, _) in listed.items():
        if names != class_names:
            raise ValueError(f"split {s!r} of {root} has classes {names}, another split has {class_names}; "
                             "tfds needs one label set")
    first = next(iter(listed.values()))[1][0].path
    shape = _decode_one(first).shape
    ds_name = name

    def generate(entries):
        for i, e in enumerate(entries):
            img = _decode_one(e.path)
            if img.shape != shape:
                raise ValueError(f"image {e.path} has size {img.shape[1]}x{img.shape[0]} but {first} has "
                                 f"{shape[1]}x{shape[0]}; all images must share one size")
            # A PIL image (not a numpy array): tfds encodes it with Pillow, not tf.image.
            yield i, {"image": Image.fromarray(img), "label": e.label,
                      "file_name": f"{e.path.parent.name}/{e.path.name}"}

    class ImageFolderTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = ds_name
        # tfds 4.9.10 resolves code_path (only to find a checksums file for
        # downloads) through `importlib_resources`, which it declares only for
        # Python < 3.9, so it crashes for builders defined in a package.
        # This builder downloads nothing: no code path needed.
        code_path = None
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: f"ImageFolder {root} prepared by jaxroute.data.prepare_imagefolder_tfds."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Images of the ImageFolder {root} (class-interleaved order).",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=shape, encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(class_names)),
                    "file_name": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(entries=entries) for s, (_, entries) in listed.items()}

        def _generate_examples(self, entries):
            return generate(entries)

    builder = ImageFolderTfds(data_dir=os.fspath(Path(data_dir).expanduser()), file_format=ARRAY_RECORD)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return Path(os.fspath(builder.data_dir))
