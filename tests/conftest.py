"""Shared test helpers: the ../shared directory and CIFAR-10 JPEG loading.

Tests that need ../shared use the ``shared_dir`` fixture (skips with a clear
reason when the directory is absent) or the ``requires_shared`` marker.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_JPEG_TEST = SHARED_DIR / "data" / "cifar10-jpeg" / "test"
CIFAR_RESNET_DIR = SHARED_DIR / "models" / "cifar10-resnet"
CIFAR_RESNET_CKPTS = {
    "resnet20": CIFAR_RESNET_DIR / "resnet20-12fca82f.th",
    "resnet32": CIFAR_RESNET_DIR / "resnet32-d509ac18.th",
}

requires_shared = pytest.mark.skipif(
    not SHARED_DIR.is_dir(), reason=f"needs the shared data/model directory {SHARED_DIR} (absent)"
)


def _skip_unless(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"needs {what} at {path} (absent)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared``; skips the test with a clear reason when it is absent."""
    return _skip_unless(SHARED_DIR, "the shared data/model directory")


def load_cifar10_jpeg(root: Path, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode an ImageFolder split of CIFAR-10 JPEGs with Pillow.

    Returns uint8 images (N, 32, 32, 3) ordered by label then file name, and
    int32 labels; the class folders sort into the canonical label order.
    """
    from PIL import Image

    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    xs, ys = [], []
    for label, cls in enumerate(classes):
        files = sorted((Path(root) / cls).glob("*.jpg"))
        if per_class is not None:
            files = files[:per_class]
        for f in files:
            with Image.open(f) as im:
                xs.append(np.asarray(im.convert("RGB"), np.uint8))
            ys.append(label)
    return np.stack(xs), np.asarray(ys, np.int32)


@pytest.fixture(scope="session")
def cifar10_test_jpeg(shared_dir) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 CIFAR-10 JPEG test images (uint8 NHWC) and labels."""
    return load_cifar10_jpeg(_skip_unless(CIFAR10_JPEG_TEST, "the CIFAR-10 JPEG test set"))


@pytest.fixture(scope="session")
def cifar10_sample(shared_dir) -> tuple[np.ndarray, np.ndarray]:
    """A few real test images: float32 NHWC in [0, 1], one or more per class (first files)."""
    x, y = load_cifar10_jpeg(_skip_unless(CIFAR10_JPEG_TEST, "the CIFAR-10 JPEG test set"), per_class=2)
    return x.astype(np.float32) / 255.0, y


@pytest.fixture(scope="session")
def cifar_resnet_ckpt(shared_dir):
    """``cifar_resnet_ckpt("resnet20")`` -> path of the shared pretrained checkpoint (or skip)."""
    def get(name: str) -> Path:
        return _skip_unless(CIFAR_RESNET_CKPTS[name], f"the pretrained {name} checkpoint")
    return get


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory) -> Path:
    """A digits CNN trained here in a few seconds: real weights for CLI, routing and attack tests."""
    from jaxroute.cli.main import main

    out = tmp_path_factory.mktemp("ckpt") / "digits_cnn"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--out", str(out), "--epochs", "6",
                 "--no-progress"]) == 0
    return out
