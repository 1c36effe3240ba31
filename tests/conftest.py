"""Shared test helpers: the ../shared directory, CIFAR-10 JPEG loading, a trained digits CNN.

Everything that needs ``../shared`` (pretrained checkpoints, real CIFAR-10
images) comes from the fixtures below, which all depend on :func:`shared`
and go through ONE rule, :func:`require`: a test whose data is absent (a
fresh clone) is skipped with a reason naming the absent path.  Every test
that uses them is marked ``shared`` automatically, so ``-m "not shared"``
selects what runs in a fresh clone.

The fixtures that need no ``../shared`` (``digits_ckpt``, ``digits_model``,
``digits_test``) train a small CNN on scikit-learn's digits in seconds:
real weights for the routing, attack and command-line tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# `pytest -n auto` runs several test processes; on a GPU each would otherwise reserve most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10_JPEG = SHARED_DIR / "data" / "cifar10-jpeg"
CIFAR10_JPEG_TEST = CIFAR10_JPEG / "test"
CIFAR_RESNET_DIR = SHARED_DIR / "models" / "cifar10-resnet"
CIFAR_RESNET_CKPTS = {
    "resnet20": CIFAR_RESNET_DIR / "resnet20-12fca82f.th",
    "resnet32": CIFAR_RESNET_DIR / "resnet32-d509ac18.th",
}


def require(path: Path, what: str) -> Path:
    """The one skip rule: ``path`` if it exists, else skip naming what is absent and where."""
    if not Path(path).exists():
        pytest.skip(f"needs {what} at {path} (absent)")
    return Path(path)


def pytest_collection_modifyitems(items):
    for item in items:
        if "shared" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared``; skips the test with a clear reason when it is absent."""
    return require(SHARED_DIR, "the shared data/model directory")


@pytest.fixture(scope="session")
def shared_dir(shared) -> Path:
    """The same directory as :func:`shared` (the name the experiment tests use)."""
    return shared


def load_cifar10_jpeg(root: Path, per_class: int | None = None,
                      interleave: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode an ImageFolder split of CIFAR-10 JPEGs with Pillow.

    Returns uint8 images (N, 32, 32, 3) and int32 labels; the class folders
    sort into the canonical label order.  Ordered by label then file name, or
    with ``interleave`` class-interleaved (file 0 of every class, then file 1, ...).
    """
    from PIL import Image

    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    files = []
    for label, cls in enumerate(classes):
        fs = sorted((Path(root) / cls).glob("*.jpg"))
        files.append([(f, label) for f in (fs if per_class is None else fs[:per_class])])
    order = ([fl for group in zip(*files) for fl in group] if interleave
             else [fl for group in files for fl in group])
    xs, ys = [], []
    for f, label in order:
        with Image.open(f) as im:
            xs.append(np.asarray(im.convert("RGB"), np.uint8))
        ys.append(label)
    return np.stack(xs), np.asarray(ys, np.int32)


@pytest.fixture(scope="session")
def cifar10_jpeg(shared) -> Path:
    """The CIFAR-10 JPEG ImageFolder (``train/`` and ``test/`` class folders)."""
    return require(CIFAR10_JPEG, "the CIFAR-10 JPEG folder")


@pytest.fixture(scope="session")
def cifar10_test_jpeg(shared) -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 CIFAR-10 JPEG test images (uint8 NHWC) and labels."""
    return load_cifar10_jpeg(require(CIFAR10_JPEG_TEST, "the CIFAR-10 JPEG test set"))


@pytest.fixture(scope="session")
def cifar10_sample(shared) -> tuple[np.ndarray, np.ndarray]:
    """A few real test images: float32 NHWC in [0, 1], two per class (first files), by class."""
    x, y = load_cifar10_jpeg(require(CIFAR10_JPEG_TEST, "the CIFAR-10 JPEG test set"), per_class=2)
    return x.astype(np.float32) / 255.0, y


@pytest.fixture(scope="session")
def cifar10_interleaved(shared):
    """``cifar10_interleaved(per_class)`` -> the first ``per_class`` test images of every class,
    class-interleaved (float32 NHWC in [0, 1], int32 labels)."""
    root = require(CIFAR10_JPEG_TEST, "the CIFAR-10 JPEG test set")
    cache = {}

    def get(per_class: int):
        if per_class not in cache:
            x, y = load_cifar10_jpeg(root, per_class=per_class, interleave=True)
            cache[per_class] = (x.astype(np.float32) / 255.0, y)
        return cache[per_class]

    return get


@pytest.fixture(scope="session")
def cifar_resnet_ckpt(shared):
    """``cifar_resnet_ckpt("resnet20")`` -> path of the shared pretrained checkpoint (or skip)."""
    def get(name: str) -> Path:
        return require(CIFAR_RESNET_CKPTS[name], f"the pretrained {name} checkpoint")
    return get


@pytest.fixture(scope="session")
def pretrained(cifar_resnet_ckpt):
    """``pretrained("resnet20")`` -> the shared pretrained model as a GatedModel (needs torch), cached."""
    cache = {}

    def get(name: str):
        if name not in cache:
            path = cifar_resnet_ckpt(name)
            pytest.importorskip("torch")
            from jaxroute.weights import load_model

            cache[name] = load_model(name, path)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def resnet20(pretrained):
    """The pretrained CIFAR-10 ResNet-20 from ../shared as a GatedModel."""
    return pretrained("resnet20")


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory) -> Path:
    """A digits CNN trained here in a few seconds: real weights for CLI, routing and attack tests."""
    from jaxroute.cli.main import main

    out = tmp_path_factory.mktemp("ckpt") / "digits_cnn"
    assert main(["train", "--model", "digits_cnn", "--data", "digits", "--out", str(out), "--epochs", "6",
                 "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def digits_model(digits_ckpt):
    """The trained digits CNN as a GatedModel."""
    from jaxroute.weights import load_model

    return load_model(None, digits_ckpt)


@pytest.fixture(scope="session")
def digits_test():
    """scikit-learn digits, test split: 360 images (8, 8, 1) in [0, 1] and labels."""
    from jaxroute.data import load_dataset

    return load_dataset("digits", "test")
