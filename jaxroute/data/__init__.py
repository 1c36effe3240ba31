"""Data sets as numpy arrays: NHWC float32 images in [0, 1], int32 labels, class names.

``load_dataset(spec, split, limit=...)`` covers scikit-learn digits, ImageFolder
trees of JPEG/PNG, CIFAR-10 python batches and tfds (TF-free, array_record);
``batches`` cuts any of them into fixed-shape batches for jitted code.
"""
from .arrays import load_arrays_split, save_arrays_split
from .core import Batch, Dataset, as_dataset, batches, num_batches
from .imagefolder import default_cache_dir
from .registry import load_dataset
from .tfds_source import prepare_imagefolder_tfds

__all__ = [
    "Batch",
    "Dataset",
    "as_dataset",
    "batches",
    "default_cache_dir",
    "load_arrays_split",
    "load_dataset",
    "num_batches",
    "prepare_imagefolder_tfds",
    "save_arrays_split",
]
