"""What the benchmarks run on: the ``../shared`` checkpoints and the CIFAR-10 JPEG images.

Every benchmark that compares jaxroute with a peer feeds both the same images:
the first ``n`` of a split in :mod:`jaxroute.data`'s class-interleaved order
(file 0 of every class, then file 1, ...), decoded by the library's loader.
Without ``../shared`` (a fresh clone) they are random images, with a printed
warning: timings are unaffected, the benchmark's other numbers are meaningless.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_JPEG = SHARED / "data" / "cifar10-jpeg"
CHECKPOINTS = {"resnet20": SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th",
               "resnet32": SHARED / "models" / "cifar10-resnet" / "resnet32-d509ac18.th"}


def cifar_images(n: int, split: str = "test") -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``n`` images of the CIFAR-10 JPEG ``split``: float32 NHWC in [0, 1], int64 labels,
    and a line saying where they came from."""
    if (CIFAR_JPEG / split).is_dir():
        from jaxroute.data import load_dataset

        ds = load_dataset(str(CIFAR_JPEG), split, limit=n).materialize()
        return (np.asarray(ds.images, np.float32), np.asarray(ds.labels, np.int64),
                f"CIFAR-10 JPEG {split} images from {CIFAR_JPEG / split}")
    print(f"WARNING: {CIFAR_JPEG / split} not found: using {n} random images in [0, 1] instead "
          "(timings are unaffected, the other numbers are meaningless)", flush=True)
    rng = np.random.default_rng(0 if split == "test" else 1)
    return (rng.random((n, 32, 32, 3), dtype=np.float32), np.arange(n, dtype=np.int64) % 10,
            "random images (data absent)")
