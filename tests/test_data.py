"""jaxroute.data: digits, ImageFolder (+ cache), CIFAR-10 pickles, tfds (offline, TF-free), array splits,
batching."""
from __future__ import annotations

import dataclasses
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxroute.data import (
    Batch, Dataset, as_dataset, batches, load_arrays_split, load_dataset, num_batches, prepare_imagefolder_tfds,
    save_arrays_split,
)
from jaxroute.data import imagefolder as imagefolder_mod

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------- digits

def test_digits_shapes_ranges_and_split_sizes():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(tr), len(te)) == (1437, 360)  # 1797 images, 20 % test (rounded up)
    for ds in (tr, te):
        assert ds.images.shape[1:] == (8, 8, 1) and ds.images.dtype == np.float32
        assert ds.labels.dtype == np.int32 and ds.class_names == tuple("0123456789")
        assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    # stratified: every class is 20 % of its digits in test, give or take one
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    assert np.all(np.abs(np.bincount(te.labels, minlength=10) - 0.2 * full) <= 1)
    # disjoint and complete: the images of both splits are exactly the 1797 digits
    d = load_digits()
    both = np.concatenate([tr.images, te.images]).reshape(-1, 64)
    ref = (d.images / 16.0).astype(np.float32).reshape(-1, 64)
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(both) == key(ref)


def test_digits_deterministic_and_limit():
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = load_dataset("digits", "test", limit=17)
    assert len(c) == 17
    np.testing.assert_array_equal(c.images, a.images[:17])


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_limit_validated(bad):
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", "test", limit=bad)


def test_unknown_spec_and_split():
    with pytest.raises(ValueError, match="unknown dataset spec 'no_such_data'"):
        load_dataset("no_such_data")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_dataset("digits", "valid")


# ----------------------------------------------------------------------------- ImageFolder

H, W = 5, 6  # not square, so a transposed array would be caught


def _pixels(label: int, idx: int) -> np.ndarray:
    """An image whose pixels encode (label, file index), with a gradient to pin orientation."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = 40 * label + 7 * idx
    img[..., 1] = np.arange(W)[None, :] * 20
    img[..., 2] = np.arange(H)[:, None] * 30
    return img


# class folder -> file names (created in this unsorted order); "cat" gets a JPEG
LAYOUT = {"dog": ["2.png", "10.png"], "ant": ["b.png", "a.png", "c.png"], "cat": ["x.jpg"]}
# sorted classes: ant=0, cat=1, dog=2; sorted files: ant a,b,c ; dog 10,2
EXPECTED_ORDER = [("ant", "a.png"), ("cat", "x.jpg"), ("dog", "10.png"),
                  ("ant", "b.png"), ("dog", "2.png"), ("ant", "c.png")]


def _write_folder(root: Path, splits=("train", "test")) -> Path:
    for split in splits:
        for cls, files in LAYOUT.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for name in files:
                label = sorted(LAYOUT).index(cls)
                idx = sorted(files).index(name)
                Image.fromarray(_pixels(label, idx)).save(root / split / cls / name)
    return root


@pytest.fixture()
def folder(tmp_path) -> Path:
    return _write_folder(tmp_path / "imgs")


def _expected(root: Path, split: str = "test"):
    xs, ys = [], []
    for cls, name in EXPECTED_ORDER:
        with Image.open(root / split / cls / name) as im:
            xs.append(np.asarray(im.convert("RGB"), np.float32) / 255)
        ys.append(sorted(LAYOUT).index(cls))
    return np.stack(xs), np.asarray(ys, np.int32)


def test_imagefolder_labels_order_and_pixels(folder, tmp_path):
    ds = load_dataset(folder, "test", cache_dir=tmp_path / "cache")
    assert ds.class_names == ("ant", "cat", "dog")
    assert ds.images.shape == (6, H, W, 3) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int32
    x, y = _expected(folder)
    np.testing.assert_array_equal(ds.labels, y)  # class-interleaved: 0 1 2 0 2 0
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0, 2, 0])
    np.testing.assert_array_equal(ds.images, x)
    # PNG is lossless: the decoded pixels are exactly what was written
    np.testing.assert_array_equal(ds.images[0], _pixels(0, 0) / np.float32(255))
    np.testing.assert_array_equal(ds.images[4], _pixels(2, 1) / np.float32(255))
    assert np.abs(ds.images[1] - _pixels(1, 0) / 255).mean() < 6 / 255  # the JPEG, within lossy error


def test_imagefolder_limit_decodes_only_the_prefix(folder, tmp_path, monkeypatch):
    calls = []
    real = imagefolder_mod._decode_one
    monkeypatch.setattr(imagefolder_mod, "_decode_one", lambda p, *a: calls.append(Path(p).name) or real(p, *a))
    ds = load_dataset(folder, "test", limit=4, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 0])
    assert sorted(calls) == sorted(n for _, n in EXPECTED_ORDER[:4])
    full = load_dataset(folder, "test", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(full.images[:4], ds.images)


def test_imagefolder_cache_hit_identical_and_used(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_dataset(folder, "test", cache_dir=cache)
    files = sorted((cache / "imagefolder").glob("*"))
    # one entry: pixels (.npy) + metadata (.npz), no temp files left behind
    assert [f.suffix for f in files] == [".npy", ".npz"] and files[0].stem == files[1].stem

    def boom(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(imagefolder_mod, "_decode_one", boom)
    second = load_dataset(folder, "test", cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.class_names == second.class_names
    # a limited load is served from the full-split cache as well
    np.testing.assert_array_equal(load_dataset(folder, "test", limit=3, cache_dir=cache).images, first.images[:3])
    # the key uses the absolute root: a relative spelling of the same folder hits the same cache
    monkeypatch.chdir(folder.parent)
    np.testing.assert_array_equal(load_dataset(f"./{folder.name}", "test", cache_dir=cache).images, first.images)
    # the cache dir can come from $JAXROUTE_CACHE
    monkeypatch.setenv("JAXROUTE_CACHE", str(cache))
    np.testing.assert_array_equal(load_dataset(folder, "test").images, first.images)


def test_imagefolder_cache_invalidated_by_changed_file(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_dataset(folder, "test", cache_dir=cache)
    new = np.full((H, W, 3), 200, np.uint8)
    target = folder / "test" / "dog" / "2.png"
    Image.fromarray(new).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # mtime surely differs
    ds = load_dataset(folder, "test", cache_dir=cache)
    np.testing.assert_array_equal(ds.images[4], new / np.float32(255))


def _corrupt_truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_flip_pixel_byte(path: Path):
    data = bytearray(path.read_bytes())
    i = data.index(b"\x93NUMPY") + 200  # inside the first array, past its header
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_garbage(path: Path):
    path.write_bytes(b"not an npz at all")


@pytest.mark.parametrize("member", ["npz", "npy"])
@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip_pixel_byte, _corrupt_garbage])
def test_imagefolder_corrupt_cache_rebuilt(folder, tmp_path, corrupt, member):
    cache = tmp_path / "cache"
    ref = load_dataset(folder, "test", cache_dir=cache)
    (path,) = (cache / "imagefolder").glob(f"*.{member}")
    if member == "npz" and corrupt is _corrupt_flip_pixel_byte:
        pytest.skip("the metadata holds no pixels; its zip CRC is covered by truncation and garbage")
    corrupt(path)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        again = load_dataset(folder, "test", cache_dir=cache, stream=True)
    np.testing.assert_array_equal(again.images.read(), ref.images)
    np.testing.assert_array_equal(again.labels, ref.labels)
    # rewritten and valid again: a second load uses it silently
    np.testing.assert_array_equal(load_dataset(folder, "test", cache_dir=cache).images, ref.images)


def test_streaming_imagefolder_reads_per_batch(folder, tmp_path, monkeypatch):
    from jaxroute.data.stored import StoredImages

    ref = load_dataset(folder, "test", cache_dir=tmp_path / "cache")
    ds = load_dataset(folder, "test", cache_dir=tmp_path / "cache", stream=True)
    assert ds.streams and not ref.streams and isinstance(ds.images, StoredImages)
    assert ds.images.shape == ref.images.shape and len(ds) == len(ref)
    reads = []
    real_read = StoredImages.read_uint8
    monkeypatch.setattr(StoredImages, "read_uint8", lambda self: reads.append(len(self)) or real_read(self))
    got = list(batches(ds, 4))
    want = list(batches(ref, 4))
    assert reads == [4, 2]  # one read per batch, of that batch's rows only
    for g, w in zip(got, want):
        assert g.images.dtype == np.float32 and g.n_valid == w.n_valid
        np.testing.assert_array_equal(g.images, w.images)
        np.testing.assert_array_equal(g.labels, w.labels)
    # lazy slices, limits and materialize
    part = ds.images[1:5][1:3]
    assert isinstance(part, StoredImages) and part.shape == (2,) + ref.image_shape
    np.testing.assert_array_equal(part.read(), ref.images[2:4])
    np.testing.assert_array_equal(ds.take(3).images.read(), ref.images[:3])
    np.testing.assert_array_equal(ds.materialize().images, ref.images)
    limited = load_dataset(folder, "test", limit=3, cache_dir=tmp_path / "cache", stream=True)
    np.testing.assert_array_equal(limited.images.read(), ref.images[:3])
    with pytest.raises(TypeError, match="row slices"):
        ds.images[[0, 2]]
    with pytest.raises(ValueError, match="step 1"):
        ds.images[::2]


def test_streaming_without_cache_warns_and_holds_images(folder, tmp_path):
    with pytest.warns(RuntimeWarning, match="stream=True needs the ImageFolder cache"):
        ds = imagefolder_mod.load_imagefolder(folder, "test", cache_dir=tmp_path / "c", use_cache=False,
                                              stream=True)
    assert not ds.streams and ds.images.dtype == np.float32


def test_stored_images_errors(tmp_path):
    from jaxroute.data.stored import StoredImages, save_stored_images

    with pytest.raises(FileNotFoundError, match="do not exist"):
        StoredImages(tmp_path / "none.npy")
    np.save(tmp_path / "f.npy", np.zeros((2, 3, 3, 1), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        StoredImages(tmp_path / "f.npy")
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .npy file"):
        StoredImages(tmp_path / "t.txt")
    x = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
    crc = save_stored_images(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(StoredImages(tmp_path / "x.npy", crc32=crc).read_uint8(), x)
    with pytest.raises(ValueError, match="corrupted: CRC-32"):
        StoredImages(tmp_path / "x.npy", crc32=crc ^ 1)
    data = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "x.npy").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        StoredImages(tmp_path / "x.npy")
    with pytest.raises(ValueError, match="uint8"):
        save_stored_images(tmp_path / "y.npy", x.astype(np.float32))


def test_imagefolder_size_mismatch(folder, tmp_path):
    odd = folder / "test" / "cat" / "y.png"
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(odd)
    with pytest.raises(ValueError, match=r"y\.png.*9x7.*6x5"):
        load_dataset(folder, "test", cache_dir=tmp_path / "cache")


def test_imagefolder_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*<split>/<class>"):
        load_dataset(tmp_path / "nope", "test", cache_dir=tmp_path / "c")
    root = _write_folder(tmp_path / "imgs", splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"imgs/test.*splits present: \['train'\]"):
        load_dataset(root, "test", cache_dir=tmp_path / "c")
    (tmp_path / "empty" / "test" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "test" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no images.*empty/test"):
        load_dataset(tmp_path / "empty", "test", cache_dir=tmp_path / "c")
    (tmp_path / "noclass" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no class folders.*noclass/test"):
        load_dataset(tmp_path / "noclass", "test", cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- CIFAR-10 python batches

def _write_cifar_batches(root: Path, per_batch: int = 4, seed: int = 0) -> dict:
    """The exact cifar-10-python.tar.gz format: pickled dicts with bytes keys, data (N, 3072) uint8 CHW."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    names = [c.encode() for c in CIFAR_CLASSES]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, f)
    written = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()  # a list of ints, as in the original
        d = {b"batch_label": f"{fname} of 6".encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{fname}_{i}.png".encode() for i in range(per_batch)]}
        with open(root / fname, "wb") as f:
            pickle.dump(d, f, protocol=2)
        written[fname] = (data, labels)
    return written


def test_cifar_pickle_round_trip(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    written = _write_cifar_batches(root)
    tr = load_dataset(root, "train")
    te = load_dataset(root, "test")
    assert tr.class_names == CIFAR_CLASSES and tr.images.shape == (20, 32, 32, 3) and len(te) == 4
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(tr.labels, labels)
    # rows are channel-major: value (n, h, w, c) sits at column c*1024 + h*32 + w
    for n, h, w, c in [(0, 0, 0, 0), (5, 1, 30, 2), (19, 31, 7, 1)]:
        assert tr.images[n, h, w, c] == np.float32(data[n, c * 1024 + h * 32 + w]) / np.float32(255)
    np.testing.assert_array_equal(te.images.reshape(4, -1, 3).transpose(0, 2, 1).reshape(4, -1) * 255,
                                  written["test_batch"][0].astype(np.float32))
    lim = load_dataset(root, "train", limit=6)  # crosses the first batch boundary
    np.testing.assert_array_equal(lim.images, tr.images[:6])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset(root, "val")
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset(root, "train")


def test_cifar_pickle_from_real_images(cifar10_jpeg, tmp_path):
    """Real CIFAR pixels through the pickle format give the same arrays as the ImageFolder load."""
    ref = load_dataset(cifar10_jpeg, "test", limit=30, cache_dir=tmp_path / "cache")
    u8 = np.round(ref.images * 255).astype(np.uint8)
    root = tmp_path / "batches"
    root.mkdir()
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in ref.class_names]}, f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": u8.transpose(0, 3, 1, 2).reshape(30, -1), b"labels": ref.labels.tolist()}, f)
    got = load_dataset(root, "test")
    np.testing.assert_array_equal(got.images, ref.images)
    np.testing.assert_array_equal(got.labels, ref.labels)
    assert got.class_names == CIFAR_CLASSES


# ----------------------------------------------------------------------------- tfds (offline, no TensorFlow)

@pytest.fixture(scope="module")
def tfds_prepared(tmp_path_factory):
    """An ImageFolder built into a real tfds array_record data set (no network, no TensorFlow)."""
    base = tmp_path_factory.mktemp("tfds")
    root = _write_folder(base / "imgs")
    data_dir = base / "tfds_data"
    out = prepare_imagefolder_tfds(root, data_dir, "jaxroute_test_imgs")
    return root, data_dir, out


def test_tfds_round_trip(tfds_prepared, tmp_path):
    root, data_dir, out = tfds_prepared
    assert (out / "dataset_info.json").is_file() and list(out.glob("*.array_record-*"))
    for split in ("train", "test"):
        got = load_dataset("tfds:jaxroute_test_imgs", split, data_dir=data_dir)
        ref = load_dataset(root, split, cache_dir=tmp_path / "cache")
        assert got.class_names == ref.class_names == ("ant", "cat", "dog")
        assert got.images.dtype == np.float32 and got.labels.dtype == np.int32
        np.testing.assert_array_equal(got.labels, ref.labels)  # same class-interleaved order
        np.testing.assert_array_equal(got.images, ref.images)  # pixel-identical (PNG inside tfds)
    got = load_dataset("tfds:jaxroute_test_imgs:1.0.0", "test", limit=2, cache_dir=data_dir)
    np.testing.assert_array_equal(got.labels, [0, 1])
    with pytest.raises(ValueError, match="unknown split 'valid'.*test.*train"):
        load_dataset("tfds:jaxroute_test_imgs", "valid", data_dir=data_dir)


def test_tfds_data_dir_from_env(tfds_prepared, monkeypatch):
    _, data_dir, _ = tfds_prepared
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    assert len(load_dataset("tfds:jaxroute_test_imgs", "train")) == 6


@pytest.mark.parametrize("name", ["mnist", "surely_not_a_tfds_dataset"])
def test_tfds_missing_is_a_clear_error(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=rf"'{name}' is not prepared in .*{tmp_path.name}.*array_record"):
        load_dataset(f"tfds:{name}", "test", data_dir=tmp_path, download=False)


def test_tfds_data_dir_only_for_tfds(folder):
    with pytest.raises(ValueError, match="data_dir applies to 'tfds:'"):
        load_dataset(folder, "test", data_dir="/tmp")


# ----------------------------------------------------------------------------- array splits (SPLIT.npz)

def test_arrays_split_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((7, 4, 5, 3), dtype=np.float32)
    y = rng.integers(0, 3, 7)
    extra = {"adv_pred": rng.integers(0, 3, 7), "success": rng.random(7) < 0.5}
    path = save_arrays_split(tmp_path / "adv", "test", x, y, ("a", "b", "c"), **extra)
    assert path == tmp_path / "adv" / "test.npz"
    with np.load(path) as z:                                        # plain numpy, extras ride along
        assert set(z.files) == {"images", "labels", "class_names", "adv_pred", "success"}
        np.testing.assert_array_equal(z["success"], extra["success"])
    for ds in (load_arrays_split(path, None), load_dataset(tmp_path / "adv", "test")):
        assert isinstance(ds, Dataset) and ds.class_names == ("a", "b", "c")
        assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
        np.testing.assert_array_equal(ds.images, x)
        np.testing.assert_array_equal(ds.labels, y)
    np.testing.assert_array_equal(load_dataset(tmp_path / "adv", "test", limit=3).images, x[:3])
    np.testing.assert_array_equal(load_arrays_split(path, 10).labels, y)          # a limit beyond N: all
    # uint8 images are read as [0, 1] floats; no class names: named by index
    u8 = (x * 255).astype(np.uint8)
    save_arrays_split(tmp_path / "u8", "train", u8, y)
    ds = load_dataset(tmp_path / "u8", "train")
    np.testing.assert_array_equal(ds.images, u8 / np.float32(255))
    assert ds.class_names == ("0", "1", "2")


def test_arrays_split_errors(tmp_path):
    x = np.zeros((3, 2, 2, 1), np.float32)
    with pytest.raises(ValueError, match=r"need images \(N, H, W, C\) and N labels"):
        save_arrays_split(tmp_path, "test", x, [0, 1])
    with pytest.raises(ValueError, match=r"need images \(N, H, W, C\)"):
        save_arrays_split(tmp_path, "test", x[0], [0, 1])
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_arrays_split(tmp_path / "bad.npz", None)
    np.savez(tmp_path / "nolabels.npz", images=x)
    with pytest.raises(ValueError, match=r"lacks arrays \['labels'\]"):
        load_dataset(tmp_path, "nolabels")
    np.savez(tmp_path / "range.npz", images=x + 2, labels=[0, 1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_dataset(tmp_path, "range")                             # values checked like any user array
    assert not list(tmp_path.glob(".*.tmp"))                        # atomic writes leave no temp files


# ----------------------------------------------------------------------------- Dataset, as_dataset

def test_as_dataset_converts_and_validates():
    u8 = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1) * 10
    ds = as_dataset(u8, np.array([0, 2], np.int64))
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images, u8 / np.float32(255))
    assert ds.class_names == ("0", "1", "2")
    assert as_dataset(np.zeros((1, 2, 2, 3)), [1], class_names=["a", "b"]).images.dtype == np.float32
    x = np.zeros((2, 3, 3, 1), np.float32)
    bad = x.copy()
    bad[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        as_dataset(bad, [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_dataset(x + 2, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        as_dataset(x[0], [0])
    with pytest.raises(TypeError, match="int16"):
        as_dataset(x.astype(np.int16), [0, 1])
    with pytest.raises(TypeError, match="integers"):
        as_dataset(x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        as_dataset(x, [0, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        as_dataset(x, [0, 5], class_names=["a", "b"])


def test_dataset_is_frozen_and_checked():
    ds = as_dataset(np.zeros((3, 2, 2, 1), np.float32), [0, 1, 0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.labels = None
    assert len(ds) == 3 and ds.num_classes == 2 and ds.image_shape == (2, 2, 1)
    assert len(ds.take(2)) == 2
    with pytest.raises(TypeError, match="float32"):
        Dataset(np.zeros((3, 2, 2, 1)), np.zeros(3, np.int32), ("a",))
    with pytest.raises(ValueError, match="labels"):
        Dataset(np.zeros((3, 2, 2, 1), np.float32), np.zeros(2, np.int32), ("a",))


# ----------------------------------------------------------------------------- batches

def test_batches_fixed_shape_padding_and_n_valid():
    x = np.arange(10 * 2 * 2 * 1, dtype=np.float32).reshape(10, 2, 2, 1) / 40
    y = np.arange(10, dtype=np.int32)
    ds = Dataset(x, y, tuple("0123456789"))
    out = list(batches(ds, 4))
    assert num_batches(10, 4) == len(out) == 3
    assert all(isinstance(b, Batch) and b.images.shape == (4, 2, 2, 1) and b.labels.shape == (4,) for b in out)
    assert [b.n_valid for b in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b.images[: b.n_valid] for b in out]), x)
    np.testing.assert_array_equal(np.concatenate([b.labels[: b.n_valid] for b in out]), y)
    last = out[-1]
    np.testing.assert_array_equal(last.labels, [8, 9, 9, 9])  # padded by repeating the last sample
    np.testing.assert_array_equal(last.images[2:], np.repeat(x[-1:], 2, axis=0))
    np.testing.assert_array_equal(last.mask(), [True, True, False, False])

    assert [b.n_valid for b in batches((x, y), 4, drop_remainder=True)] == [4, 4]
    assert num_batches(10, 4, drop_remainder=True) == 2
    unpadded = list(batches((x, y), 4, pad=False))
    assert unpadded[-1].images.shape == (2, 2, 2, 1) and unpadded[-1].n_valid == 2
    resumed = list(batches(ds, 4, start=2))
    assert len(resumed) == 1 and resumed[0].n_valid == 2
    np.testing.assert_array_equal(resumed[0].images, last.images)
    only_x = list(batches(x, 5))
    assert [b.n_valid for b in only_x] == [5, 5] and only_x[0].labels is None
    assert list(batches(x, 4, start=3)) == []
    assert num_batches(0, 4) == 0 and list(batches(x[:0], 4)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(ds, 0))
    with pytest.raises(ValueError, match="differ"):
        list(batches((x, y[:3]), 4))


# ----------------------------------------------------------------------------- ../shared CIFAR-10 JPEG

def test_shared_cifar10_jpeg_limit_is_class_balanced(cifar10_jpeg, tmp_path):
    ds = load_dataset(cifar10_jpeg, "test", limit=200, cache_dir=tmp_path / "cache")
    assert ds.class_names == CIFAR_CLASSES
    assert ds.images.shape == (200, 32, 32, 3)
    assert np.bincount(ds.labels, minlength=10).tolist() == [20] * 10
    np.testing.assert_array_equal(ds.labels[:20], list(range(10)) * 2)
    # sample 11 is file 0001.jpg of class 1 (automobile), decoded like any Pillow user would
    with Image.open(cifar10_jpeg / "test" / "automobile" / "0001.jpg") as im:
        ref = np.asarray(im.convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(ds.images[11], ref)


@pytest.mark.slow
def test_shared_cifar10_jpeg_full_load_and_cache(cifar10_jpeg, tmp_path, monkeypatch):
    tr = load_dataset(cifar10_jpeg, "train", cache_dir=tmp_path)
    te = load_dataset(cifar10_jpeg, "test", cache_dir=tmp_path)
    assert (len(tr), len(te)) == (50000, 10000)
    assert np.bincount(tr.labels).tolist() == [5000] * 10

    def boom(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(imagefolder_mod, "_decode_one", boom)        # the second load reads the cache only
    tr2 = load_dataset(cifar10_jpeg, "train", cache_dir=tmp_path)
    te2 = load_dataset(cifar10_jpeg, "test", cache_dir=tmp_path)
    np.testing.assert_array_equal(tr.images, tr2.images)
    np.testing.assert_array_equal(te.labels, te2.labels)
