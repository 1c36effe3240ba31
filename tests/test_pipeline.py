"""Input pipeline: model-card preprocessing, grain streaming of variable-size folders, conversion, sharding."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxroute.cli.main import main
from jaxroute.data import load_dataset
from jaxroute.data.imagefolder import stream_imagefolder
from jaxroute.data.preprocess import Preprocess, preprocess_for


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Decoded caches of these throwaway folders go under the test's tmp dir, not ~/.cache."""
    monkeypatch.setenv("JAXROUTE_CACHE", str(tmp_path / "default-cache"))


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def pillow_reference(path, resize: int, crop: int, mode: str = "RGB") -> np.ndarray:
    """The evaluation transform written out with plain Pillow: shorter side -> resize, centre crop."""
    with Image.open(path) as im:
        im = im.convert(mode)
        w, h = im.size
        scale = resize / min(w, h)
        nw, nh = (resize, int(h * scale)) if w <= h else (int(w * scale), resize)
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = round((nw - crop) / 2), round((nh - crop) / 2)
        return np.asarray(im.crop((left, top, left + crop, top + crop)), np.uint8).reshape(crop, crop, -1)


def _write(img: Image.Image, path: Path, k: int) -> Path:
    """Every third image grayscale, every other one PNG: the mix a real collection has."""
    if k % 3 == 1:
        img = img.convert("L")
    path = path.with_suffix(".png" if k % 2 else ".jpg")
    img.save(path)
    return path


def make_folder(root: Path, images_by_class: dict, seed: int = 0) -> list[Path]:
    """ImageFolder ROOT/test/<class>/ of the given images, each resized to a random size in 48..512."""
    rng = np.random.default_rng(seed)
    files, k = [], 0
    for cls, imgs in images_by_class.items():
        d = root / "test" / cls
        d.mkdir(parents=True)
        for j, a in enumerate(imgs):
            w, h = (int(v) for v in rng.integers(48, 513, size=2))
            img = Image.fromarray(a).resize((w, h), Image.Resampling.BICUBIC)
            files.append(_write(img, d / f"{j:03d}", k))
            k += 1
    return files


def synthetic_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour images (upsampled noise) with some fine texture, 32x32 uint8."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.uniform(0, 255, (4, 4, 3))
        a = np.kron(base, np.ones((8, 8, 1))) + rng.normal(0, 12, (32, 32, 3))
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return out


@pytest.fixture
def mixed_folder(tmp_path):
    imgs = synthetic_images(6)
    root = tmp_path / "photos"
    files = make_folder(root, {"a_class": imgs[:3], "b_class": imgs[3:]})
    return root, files


@pytest.fixture
def cifar_mixed_folder(tmp_path, cifar10_jpeg):
    """Real CIFAR-10 test images (two of each of 3 classes) resized to random sizes 48..512."""
    by_class = {}
    for cls in sorted(p.name for p in (cifar10_jpeg / "test").iterdir())[:3]:
        files = sorted((cifar10_jpeg / "test" / cls).glob("*.jpg"))[:2]
        by_class[cls] = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    root = tmp_path / "cifar-mixed"
    return root, make_folder(root, by_class, seed=1)


def _interleaved(files):
    """The canonical order of a folder: class-interleaved, by file name within a class."""
    by_class = {}
    for f in files:
        by_class.setdefault(f.parent.name, []).append(f)
    groups = [sorted(v, key=lambda p: p.name) for _, v in sorted(by_class.items())]
    return [g[r] for r in range(max(map(len, groups))) for g in groups if r < len(g)]


# ---------------------------------------------------------------------------- preprocessing
def test_model_cards_state_their_preprocessing():
    for name in ("resnet18", "resnet50", "vgg16", "alexnet"):
        assert preprocess_for(name, (224, 224, 3)) == Preprocess(256, 224, 3)
    assert preprocess_for("resnet20", (32, 32, 3)) == Preprocess(32, 32, 3)
    assert preprocess_for("digits_cnn", (8, 8, 1)) == Preprocess(8, 8, 1)
    assert preprocess_for("resnet18", (224, 224, 3), resize=300) == Preprocess(300, 224, 3)
    assert preprocess_for("resnet18", (224, 224, 3), crop=112) == Preprocess(128, 112, 3)
    with pytest.raises(ValueError, match="crop .* must be <= resize"):
        Preprocess(100, 224)
    with pytest.raises(ValueError, match="Preprocess.resize"):
        Preprocess(0, 0)


@pytest.mark.parametrize("pre", [Preprocess(256, 224), Preprocess(32, 32), Preprocess(73, 64)])
def test_preprocessing_equals_a_pillow_reference(mixed_folder, pre, tmp_path):
    root, files = mixed_folder
    ds = load_dataset(root, "test", preprocess=pre, workers=0, stream=True, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (len(files), pre.crop, pre.crop, 3)
    got = ds.images.read_uint8()
    want = np.stack([pillow_reference(f, pre.resize, pre.crop) for f in _interleaved(files)])
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # within 1/255 per pixel
    assert ds.info["preprocess"]["center_crop"] == pre.crop
    assert ds.info["pipeline"] == ("grain" if pre.crop > 64 else "decoded cache")


def test_cifar_models_keep_the_decoded_cache_and_resize_odd_sizes(mixed_folder, tmp_path):
    root, files = mixed_folder
    pre = preprocess_for("resnet20", (32, 32, 3))
    ds = load_dataset(root, "test", preprocess=pre, cache_dir=tmp_path / "cache", stream=True)
    assert type(ds.images).__name__ == "StoredImages" and ds.info["pipeline"] == "decoded cache"
    want = np.stack([pillow_reference(f, 32, 32) for f in _interleaved(files)])
    assert np.abs(ds.images.read_uint8().astype(int) - want.astype(int)).max() <= 1
    gray = load_dataset(root, "test", preprocess=Preprocess(8, 8, 1), cache_dir=tmp_path / "cache")
    assert gray.images.shape == (len(files), 8, 8, 1)


@pytest.mark.slow  # starting worker processes (each imports grain, numpy, Pillow) takes tens of seconds on 2 cores
def test_worker_processes_give_the_same_order_and_pixels(mixed_folder):
    root, _ = mixed_folder
    pre = Preprocess(40, 36)
    one = stream_imagefolder(root, "test", pre, workers=0).images
    two = one.with_workers(2)
    a = np.concatenate(list(one.iter_ranges([(0, 6)], 2)))
    b = np.concatenate(list(two.iter_ranges([(0, 6)], 2)))
    np.testing.assert_array_equal(a, b)
    # ranges never share a batch: 3 + 3 rows in batches of 2 -> 2, 1, 2, 1
    assert [len(x) for x in two.iter_ranges([(0, 3), (3, 6)], 2)] == [2, 1, 2, 1]


# ---------------------------------------------------------------------------- routing
def _route(folder, model, out, *extra):
    return main(["route", "--model", model, "--data", str(folder), "--split", "test", "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--shard-size", "2", "--decode-workers", "0",
                 "--no-progress", "--json", *extra])


def _check_routed(out, n):
    manifest = json.loads((out / "manifest.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert manifest["num_samples"] == n and summary["n"] == n
    return manifest, summary


@pytest.mark.slow  # compiling resnet18 DGR at 224 x 224 takes minutes on 2 shared cores
def test_mixed_size_folder_routes_with_resnet18(mixed_folder, tmp_path, capsys):
    root, files = mixed_folder
    out = tmp_path / "r18"
    assert _route(root, "resnet18", out, "--limit", "2") == 0
    res = last_json(capsys)
    manifest, _ = _check_routed(out, 2)
    assert manifest["extra"]["input"]["preprocess"]["resize_shorter"] == 256
    assert manifest["extra"]["input"]["preprocess"]["center_crop"] == 224
    assert manifest["extra"]["input"]["pipeline"] == "grain"
    assert res["n"] == 2


@pytest.mark.slow  # compiling resnet20 DGR takes over a minute on 2 shared cores
@pytest.mark.parametrize("variant", ["synthetic", "cifar"])
def test_mixed_size_folder_routes_with_resnet20(variant, request, tmp_path, capsys):
    root, files = request.getfixturevalue("mixed_folder" if variant == "synthetic" else "cifar_mixed_folder")
    out = tmp_path / "r20"
    extra = ("--resize", "40") if variant == "synthetic" else ()
    assert _route(root, "resnet20", out, *extra) == 0
    manifest, summary = _check_routed(out, len(files))
    assert manifest["extra"]["input"]["preprocess"]["center_crop"] == 32
    # a user override is recorded
    assert manifest["extra"]["input"]["preprocess"]["resize_shorter"] == (40 if extra else 32)
    capsys.readouterr()


def test_mixed_size_folder_routes_with_a_small_model(mixed_folder, tmp_path, capsys):
    """The same CLI path with the digits CNN (compiles in seconds): grayscale 8 x 8 from any sizes
    through the decoded cache (the grain stream: the --skip-bad route below)."""
    root, files = mixed_folder
    out = tmp_path / "digits"
    assert _route(root, "digits_cnn", out, "--resize", "9") == 0
    manifest, _ = _check_routed(out, len(files))
    inp = manifest["extra"]["input"]
    assert inp["pipeline"] == "decoded cache"
    assert inp["preprocess"] == Preprocess(9, 8, 1).to_json() and inp["skipped"] == []
    capsys.readouterr()


def test_two_processes_route_disjoint_halves_whose_union_is_one_run(mixed_folder, tmp_path):
    """Each process decodes only the rows of its own shards; together they equal one process."""
    from jaxroute.data.pipeline import DecodeFile
    from jaxroute.extraction import load_shards, plan_batches, run_extraction
    import jax

    root, files = mixed_folder
    seen = []

    class Spy(DecodeFile):
        def __call__(self, path):
            seen.append(path)
            return super().__call__(path)

    def fn(x, y, idx):  # any per-sample function: the job and the stream are what is tested
        return {"mean": x.mean(axis=(1, 2, 3)), "corner": x[:, 0, 0, :]}

    ds = stream_imagefolder(root, "test", Preprocess(48, 40), workers=0)
    ds.images.transform = Spy(ds.images.transform.preprocess)
    plan = plan_batches(len(ds), 1, 1)  # one global batch per shard: 3 or 6 shards
    fn = jax.jit(fn)
    run_extraction(fn, ds, tmp_path / "one", job={"t": 1}, plan=plan, progress=False, process_index=0, process_count=1)
    one = load_shards(tmp_path / "one")
    halves = []
    for pi in (0, 1):
        seen.clear()
        run_extraction(fn, ds, tmp_path / "two", job={"t": 1}, plan=plan, progress=False, process_index=pi,
                       process_count=2)
        halves.append(set(seen))
    assert halves[0] and halves[1] and not halves[0] & halves[1]
    assert halves[0] | halves[1] == {str(f) for f in files}
    two = load_shards(tmp_path / "two")
    assert set(one) == set(two)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


# ---------------------------------------------------------------------------- bad files, conversion
def test_corrupt_file_is_a_one_line_error_or_skipped(mixed_folder, tmp_path, capsys):
    root, files = mixed_folder
    bad = root / "test" / "a_class" / "001-broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    # the grain stream (large inputs) stops with one line naming the file
    ds = stream_imagefolder(root, "test", Preprocess(64, 64), workers=0)
    with pytest.raises(ValueError, match="001-broken.jpg") as e:
        ds.images.read()
    assert "\n" not in str(e.value)
    # so does the CLI (here the decoded-cache path)
    assert _route(root, "digits_cnn", tmp_path / "fail") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "001-broken.jpg" in err[0]
    # --skip-bad: left out, listed in the manifest; everything else routed
    out = tmp_path / "skip"
    assert _route(root, "digits_cnn", out, "--skip-bad") == 0
    manifest, _ = _check_routed(out, len(files))
    assert manifest["extra"]["input"]["pipeline"] == "grain"
    skipped = manifest["extra"]["input"]["skipped"]
    assert [s["file"] for s in skipped] == ["test/a_class/001-broken.jpg"] and "cannot decode" in skipped[0]["error"]
    capsys.readouterr()


def test_convert_writes_array_record_that_route_reads(mixed_folder, tmp_path, capsys):
    root, files = mixed_folder
    out = tmp_path / "converted"
    assert main(["data", "convert", "--data", str(root), "--split", "test", "--model", "resnet20", "--out",
                 str(out), "--decode-workers", "0", "--no-progress", "--json"]) == 0
    res = last_json(capsys)
    assert res["num_records"] == len(files) and res["shape"] == [32, 32, 3]
    assert (out / "test.array_record").is_file()
    conv = load_dataset(out, "test", workers=0, stream=True)
    direct = stream_imagefolder(root, "test", Preprocess(32, 32), workers=0)
    np.testing.assert_array_equal(conv.images.read_uint8(), direct.images.read_uint8())
    np.testing.assert_array_equal(conv.labels, direct.labels)
    assert conv.class_names == direct.class_names
    assert main(["data", "convert", "--data", str(root), "--split", "test", "--model", "resnet20", "--out",
                 str(out)]) == 2  # never overwritten
    # route reads a converted split (the digits CNN: a model that compiles in seconds)
    small = tmp_path / "converted-digits"
    assert main(["data", "convert", "--data", str(root), "--split", "test", "--model", "digits_cnn", "--out",
                 str(small), "--decode-workers", "0", "--no-progress"]) == 0
    routed = tmp_path / "routed"
    assert _route(small, "digits_cnn", routed) == 0
    assert _route(small, "digits_cnn", tmp_path / "x", "--resize", "9") == 2  # already preprocessed
    manifest, _ = _check_routed(routed, len(files))
    assert manifest["extra"]["input"]["source"] == "records"
    capsys.readouterr()


def test_a_cache_of_images_already_at_the_input_size_serves_their_preprocessing(tmp_path):
    root = tmp_path / "fixed"
    for k, a in enumerate(synthetic_images(4, seed=3)):
        d = root / "test" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{k}.png")
    raw = load_dataset(root, "test", cache_dir=tmp_path / "c", stream=True)
    pre = load_dataset(root, "test", cache_dir=tmp_path / "c", stream=True, preprocess=Preprocess(32, 32))
    assert pre.images.path == raw.images.path  # no second decode, no second cache entry
    np.testing.assert_array_equal(pre.images.read_uint8(), raw.images.read_uint8())
    assert len(list((tmp_path / "c" / "imagefolder").glob("*.npy"))) == 1


def test_tfds_data_source_streams_through_the_preprocessing(tmp_path):
    """A tfds array_record split (built offline from a folder) is decoded per record by grain."""
    pytest.importorskip("tensorflow_datasets")
    from jaxroute.data import prepare_imagefolder_tfds

    root = tmp_path / "fixed"
    for k, a in enumerate(synthetic_images(4, seed=5)):
        d = root / "test" / f"c{k % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).resize((40, 48)).save(d / f"{k}.png")
    prepare_imagefolder_tfds(root, tmp_path / "tfds", "jaxroute_pipeline_imgs")
    pre = Preprocess(36, 32)
    got = load_dataset("tfds:jaxroute_pipeline_imgs", "test", data_dir=tmp_path / "tfds", preprocess=pre,
                       workers=0, stream=True)
    ref = stream_imagefolder(root, "test", pre, workers=0)
    assert got.info["source"] == "tfds" and got.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(got.images.read_uint8(), ref.images.read_uint8())  # PNG inside: lossless


@pytest.mark.slow  # three processes each start JAX and compile
def test_two_jax_distributed_processes_equal_one(mixed_folder, tmp_path):
    """Two real jax.distributed processes route a variable-size folder through the grain stream
    (--skip-bad forces it for the small model) into one output; it equals a one-process run."""
    import os
    import socket
    import subprocess
    import sys

    from jaxroute.extraction import load_shards

    root, files = mixed_folder
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAXROUTE_CPU_DEVICES": "1", "PYTHONPATH": str(repo)}
    base = [sys.executable, "-m", "jaxroute.cli.main", "route", "--model", "digits_cnn", "--data", str(root),
            "--split", "test", "--steps", "2", "--batch-size", "1", "--shard-size", "1", "--skip-bad",
            "--decode-workers", "1", "--no-progress"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen(base + ["--out", str(tmp_path / "two"), "--coordinator", addr, "--num-processes", "2",
                                      "--process-id", str(i)], env=env, cwd=repo, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    one = subprocess.run(base + ["--out", str(tmp_path / "one")], env=env, cwd=repo, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr
    a, b = load_shards(tmp_path / "one"), load_shards(tmp_path / "two")
    assert len(a["index"]) == len(files) and set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
