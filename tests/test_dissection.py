"""Network dissection: the Broden format, the tally against a plain transcription of NetDissect-Lite's
rules, upsampling against Pillow, thresholds against np.quantile, the concept set, the CLI, and the
domain-alignment losses against float64 references."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.dissection import (BrodenError, DissectConfig, Record, read_broden, tally_batch, unit_thresholds,
                                 upsample_bilinear, write_broden)
import importlib

dissect_mod = importlib.import_module("jaxroute.dissection.dissect")
from jaxroute.dissection.concepts import COLOR_NAMES, TEXTURE_NAMES, build_concepts, texture_pattern
from jaxroute.training import domain

CATS = ("object", "part", "texture", "color")
LABELS = [(1, "red"), (2, "blue"), (3, "striped"), (5, "dog"), (7, "wheel"), (8, "dotted"), (300, "car"),
          (9, "unused")]


def _records(rng, n=7, size=8):
    """Pixel and image-level labels, multi-label and empty cells, label 300 >= 256, label 7 (wheel)
    in two categories (object and part), an image with no labels at all."""
    recs = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        color = rng.choice([0, 1, 2], (size, size), p=[0.3, 0.4, 0.3]).astype(np.int32)
        masks, scalars = {}, {}
        if i % 7 != 4:
            masks["color"] = [color] if i % 2 else [color, np.where(color == 1, 0, 2 * (color > 0)).astype(np.int32)]
        if i % 3 == 0:
            obj = np.zeros((size, size), np.int32)
            obj[1:4, 2:6] = 300
            obj[5:7, 0:3] = 7
            masks["object"] = [obj]
        elif i % 3 == 1 and i != 4:
            scalars["object"] = [5]
        if i % 2 == 1:
            part = np.zeros((size, size), np.int32)
            part[rng.integers(0, size, 6), rng.integers(0, size, 6)] = 7
            masks["part"] = [part]
        if i % 4 == 0 and i != 4:
            scalars["texture"] = [3] if i % 8 else [3, 8]
        recs.append(Record(img, masks, scalars, "train"))
    return recs


@pytest.fixture
def fixture_dir(tmp_path):
    rng = np.random.default_rng(0)
    recs = _records(rng)
    b = write_broden(tmp_path / "broden", recs, LABELS, CATS)
    return b, recs


def test_broden_round_trip(fixture_dir):
    b, recs = fixture_dir
    assert b.categories == CATS and len(b) == len(recs)
    back = list(b.records())
    for r, s in zip(recs, back):
        np.testing.assert_array_equal(r.image, s.image)
        assert {k: v for k, v in r.scalars.items() if v} == dict(s.scalars)
        assert set(k for k, v in r.masks.items() if v) == set(s.masks)
        for cat, ms in r.masks.items():
            for m, m2 in zip(ms, s.masks[cat]):
                np.testing.assert_array_equal(m, m2)
    labels = {lab.number: lab for lab in b.labels}
    assert set(labels[7].categories) == {"object", "part"}      # a label in two categories
    assert labels[300].name == "car" and labels[9].frequency == 0
    assert any(300 in np.unique(m) for s in back for m in s.masks.get("object", ()))
    # writing what was read gives the same CSV files
    b2 = write_broden(b.root.parent / "again", back, LABELS, CATS)
    for name in ("index.csv", "label.csv", "category.csv", "c_object.csv", "c_part.csv"):
        assert (b.root / name).read_text() == (b2.root / name).read_text()
    # the primary category of wheel is the one where it covers more; ties go to the later category
    cov = b.coverage_table()[7]
    assert b.primary_categories()[7] == max((c, i) for i, c in enumerate(cov))[1]


def test_broden_errors(fixture_dir, tmp_path):
    import shutil

    from PIL import Image

    b, _ = fixture_dir
    for missing in ("index.csv", "label.csv", "category.csv", "c_color.csv"):
        d = tmp_path / f"no-{missing}"
        shutil.copytree(b.root, d)
        (d / missing).unlink()
        with pytest.raises(FileNotFoundError, match=missing):
            read_broden(d)
    # a mask with a label not in label.csv
    d = tmp_path / "bad-label"
    shutil.copytree(b.root, d)
    row = next(r for r in read_broden(d).index if r["color"])
    mask = d / "images" / row["color"].split(";")[0]
    arr = np.asarray(Image.open(mask).convert("RGB")).copy()
    arr[0, 0] = (45, 1, 0)
    Image.fromarray(arr).save(mask)
    with pytest.raises(BrodenError, match="not in label.csv"):
        list(read_broden(d).records())
    # a mask whose size is not sh x sw
    d = tmp_path / "bad-size"
    shutil.copytree(b.root, d)
    Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(d / "images" / row["color"].split(";")[0])
    with pytest.raises(BrodenError, match="sh x sw"):
        list(read_broden(d).records())
    # an index column that is not a category
    d = tmp_path / "bad-cat"
    shutil.copytree(b.root, d)
    text = (d / "index.csv").read_text().replace(",color", ",colour", 1)
    (d / "index.csv").write_text(text)
    with pytest.raises(BrodenError, match="'colour' is not a category"):
        read_broden(d)
    with pytest.raises(ValueError, match="unknown category"):
        write_broden(tmp_path / "w", [Record(np.zeros((4, 4, 3), np.uint8), {}, {"scene": [1]})], LABELS, CATS)


# --------------------------------------------------------------------------- the tally

def _lite_reference(features, thresholds, records, labelcat, sh, sw, rules="lite", compare=">"):
    """NetDissect-Lite's tally_job, transcribed as its plain loops (float64), plus Bau's union."""
    L, C = labelcat.shape
    U = features.shape[1]
    gt = np.greater if compare == ">" else np.greater_equal
    wy = dissect_mod.pillow_bilinear_weights(features.shape[2], sh)
    wx = dissect_mod.pillow_bilinear_weights(features.shape[3], sw)
    tally_labels = np.zeros(L)
    tally_units = np.zeros(U)
    tally_units_cat = np.zeros((U, C))
    tally_both = np.zeros((U, L))
    for img_index, rec in enumerate(records):
        scalars, pixels = [], []
        for cat in CATS:
            scalars += list(rec.scalars.get(cat, ()))
            for m in rec.masks.get(cat, ()):
                pixels.append(m[None])
        for scalar in scalars:
            tally_labels[scalar] += sh * sw
        if pixels:
            pixels = np.concatenate(pixels)
            tally_label = np.bincount(pixels.ravel())
            if len(tally_label) > 0:
                tally_label[0] = 0
            tally_labels[:len(tally_label)] += tally_label
        for unit_id in range(U):
            feature_map = features[img_index][unit_id]
            if gt(feature_map.max(), thresholds[unit_id]):
                mask = wy @ feature_map @ wx.T
                indexes = np.argwhere(gt(mask, thresholds[unit_id]))
                tally_units[unit_id] += len(indexes)
                tally_cat = np.zeros(C)  # Lite reuses a stale value here when an image has no pixel labels
                if len(pixels) > 0:
                    tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel())
                    if len(tally_bt) > 0:
                        tally_bt[0] = 0
                    tally_cat = np.dot(tally_bt[None, :], labelcat[:len(tally_bt), :])[0]
                    tally_both[unit_id, :len(tally_bt)] += tally_bt
                for scalar in scalars:
                    tally_cat += labelcat[scalar]
                    tally_both[unit_id, scalar] += len(indexes)
                tally_units_cat[unit_id] += len(indexes) * (tally_cat > 0)
    if rules == "lite":
        union_units = np.dot(tally_units_cat, labelcat.T)
    else:
        union_units = tally_units[:, None]
    iou = tally_both / (union_units + tally_labels[np.newaxis, :] - tally_both + 1e-10)
    return tally_labels, tally_units, tally_both, iou


@pytest.mark.parametrize("rules,compare", [("lite", ">"), ("lite", ">="), ("bau", ">=")])
def test_tally_equals_lite_loops(fixture_dir, rules, compare):
    b, _ = fixture_dir
    records = list(b.records())
    rng = np.random.default_rng(1)
    n, U, h = len(records), 5, 3
    features = rng.normal(size=(n, U, h, h))
    features[2, 1] = -5.0  # a unit silent on one image
    thresholds = np.quantile(features.transpose(1, 0, 2, 3).reshape(U, -1), 0.7, axis=1)
    labelcat = dissect_mod.labelcat_matrix(b)
    sh, sw = b.mask_shape()
    ref = _lite_reference(features, thresholds, records, labelcat, sh, sw, rules, compare)
    with jax.enable_x64():
        totals = None
        for lo in range(0, n, 4):  # batches of 4 with padding, as the pipeline runs
            batch = next(dissect_mod.label_batches(b, 4, lo, min(lo + 4, n)))
            f = np.zeros((4, h, h, U))
            f[:batch["n_valid"]] = features[lo:lo + 4].transpose(0, 2, 3, 1)
            r = tally_batch(jnp.asarray(f), jnp.asarray(thresholds), jnp.asarray(batch["pixels"]),
                            jnp.asarray(batch["scalars"]), jnp.asarray(batch["valid"]), jnp.asarray(labelcat),
                            size=(sh, sw), rules=rules, compare=compare)
            r = {k: np.asarray(v, np.float64) for k, v in r.items()}
            t = dissect_mod.Tally(r["labels"], r["units"], r["both"], r.get("units_cat"))
            totals = t if totals is None else totals + t
    np.testing.assert_allclose(totals.labels, ref[0], atol=1e-12)
    np.testing.assert_allclose(totals.units, ref[1], atol=1e-12)
    np.testing.assert_allclose(totals.both, ref[2], atol=1e-12)
    cfg = DissectConfig(rules=rules, compare=compare)
    res = dissect_mod.score_layer("x", thresholds, totals, b, cfg)
    np.testing.assert_allclose(res.iou, ref[3], atol=1e-12)
    assert totals.both.sum() > 0 and (res.iou > 0).any()
    # Lite's selection: best label per primary category, then the best category
    primary = b.primary_categories()
    for u in range(U):
        best = max(((ref[3][u] * (primary == c)).max(), c) for c in range(len(CATS)))
        assert res.score[u] == pytest.approx(best[0], abs=1e-12)
    rows = dissect_mod.tally_rows(res)
    assert [r["unit"] for r in rows] == [int(u) + 1 for u in np.argsort(-res.score, kind="stable")]


def test_planted_unit_detects_its_concept(tmp_path):
    """A unit whose activation is a concept mask gets that concept with IoU > 0.9."""
    rng = np.random.default_rng(2)
    recs = []
    for i in range(24):
        blob = np.zeros((16, 16), np.int32)
        y, x = rng.integers(0, 13, 2)
        blob[y:y + 3, x:x + 2] = 2
        color = rng.integers(0, 2, (16, 16)) * 3
        img = np.zeros((16, 16, 3), np.uint8)
        img[..., 0] = (blob > 0) * 255
        img[..., 1] = rng.integers(0, 256, (16, 16))
        recs.append(Record(img, {"object": [blob], "color": [color.astype(np.int32)]}, {"texture": [4]}))
    b = write_broden(tmp_path / "planted", recs, [(2, "blob"), (3, "spot"), (4, "woven")],
                     ("object", "texture", "color"))
    frac = 6 / 256

    def acts(x):
        planted = x[..., :1] * (1 + 0.01 * x[..., 1:2])   # the mask, ordered inside by channel 1
        noise = x[..., 1:2]
        return {"l": jnp.concatenate([planted, noise], -1)}

    cfg = DissectConfig(quantile=frac * 0.97)
    batches = ((dissect_mod.to_unit_float(bt["images"]), bt["valid"]) for bt in dissect_mod.label_batches(b, 8))
    th = unit_thresholds(acts, batches, len(b), cfg.quantile)
    res = dissect_mod.score_layer("l", th["l"], dissect_mod.tally_layers(acts, b, th, cfg)["l"], b, cfg)
    names = res.label_names
    assert names[res.label[0]] == "blob" and res.score[0] > 0.9
    assert res.score[1] < 0.5


# --------------------------------------------------------------------------- upsampling and thresholds

@pytest.mark.parametrize("src,dst", [((4, 4), (32, 32)), ((8, 8), (32, 32)), ((7, 7), (113, 113)),
                                     ((3, 5), (8, 13)), ((2, 2), (7, 7)), ((5, 5), (5, 5))])
def test_upsampling_equals_pillow_float_bilinear(src, dst):
    from PIL import Image

    rng = np.random.default_rng(3)
    maps = rng.normal(size=(2,) + src + (3,)).astype(np.float32)
    out = np.asarray(upsample_bilinear(jnp.asarray(maps), dst))
    for bi in range(2):
        for u in range(3):
            ref = np.asarray(Image.fromarray(maps[bi, :, :, u], mode="F").resize(dst[::-1], Image.BILINEAR))
            np.testing.assert_allclose(out[bi, u], ref, atol=1e-5)


def test_thresholds_equal_np_quantile():
    rng = np.random.default_rng(4)
    n, h, U = 37, 3, 6
    data = rng.normal(size=(n, h, h, U)).astype(np.float32)
    data[:, :, :, 5] = np.round(data[:, :, :, 5])  # ties
    batches = []
    for lo in range(0, n, 8):
        x = np.zeros((8, h, h, U), np.float32)
        x[:min(8, n - lo)] = data[lo:lo + 8]
        batches.append((x, np.arange(8) < n - lo))
    for q in (0.005, 0.05, 0.3):
        th = unit_thresholds(lambda x: {"l": x}, iter(batches), n, q)["l"]
        ref = np.quantile(data.astype(np.float64).reshape(-1, U), 1 - q, axis=0)
        np.testing.assert_allclose(th, ref, rtol=0, atol=1e-12)
        assert dissect_mod.topk_size(n * h * h, q) <= q * n * h * h + 2


def test_streaming_topk_equals_a_sort_over_everything():
    rng = np.random.default_rng(5)
    chunks = [np.round(rng.normal(size=(3, m)), 1).astype(np.float32) for m in (50, 7, 400, 1, 120, 33)]
    chunks[2][1] = 9.0  # one unit with a run of equal values at the top
    everything = np.concatenate(chunks, axis=1)
    for k in (1, 5, 64, 300, everything.shape[1]):
        top = dissect_mod.StreamingTopK(3, k)
        for c in chunks:
            top.add(c)
        np.testing.assert_array_equal(top.values(), -np.sort(-everything, axis=1)[:, :k])


def test_config_and_layer_errors():
    with pytest.raises(ValueError, match="quantile"):
        DissectConfig(quantile=1.0)
    with pytest.raises(ValueError, match="quantile"):
        DissectConfig(quantile=0)
    with pytest.raises(ValueError, match="rules"):
        DissectConfig(rules="x")


def test_no_scipy_misc_and_no_stopiteration(fixture_dir):
    import re

    src = Path(dissect_mod.__file__).parent
    for f in src.glob("*.py"):
        assert not re.search(r"^\s*(import scipy\.misc|from scipy\.misc|from scipy import misc)", f.read_text(), re.M)
    b, _ = fixture_dir
    sizes = [bt["n_valid"] for bt in dissect_mod.label_batches(b, 3)]
    assert sizes == [3, 3, 1]


# --------------------------------------------------------------------------- a model end to end

@pytest.fixture(scope="module")
def tiny_resnet():
    from jaxroute.weights import load_model

    return load_model("resnet20", None, key=jax.random.key(0))


def _color_table(path):
    np.save(path, np.random.default_rng(5).integers(0, 11, (32, 32, 32)).astype(np.uint8))
    return path


def test_dissect_model_keyed_by_layer_and_data(tmp_path, tiny_resnet):
    from jaxroute.dissection import dissect_to_dir

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    b = build_concepts(tmp_path / "c", images, np.arange(6) % 3, ("a", "b", "c"), _color_table(tmp_path / "t.npy"),
                       textures_per_name=1)
    assert len(b) == 6 + len(TEXTURE_NAMES)
    desc = {"arch": "resnet20", "weights": None}
    cfg = DissectConfig(batch_size=8)
    out = tmp_path / "out"
    res = dissect_to_dir(tiny_resnet, b, ["layer1.2", "layer3.2"], out, model_desc=desc, config=cfg)
    assert res["layer1.2"]["units"] == 16 and res["layer3.2"]["units"] == 64
    t1 = np.load(out / "layer1.2" / "clean" / "quantile.npy")
    t3 = np.load(out / "layer3.2" / "clean" / "quantile.npy")
    assert t1.shape == (16,) and t3.shape == (64,)
    tally1 = (out / "layer1.2" / "clean" / "tally.csv").read_text()
    assert tally1 != (out / "layer3.2" / "clean" / "tally.csv").read_text()
    header = next(csv.reader(tally1.splitlines()))
    assert header[:4] == ["unit", "category", "label", "score"] and "color-iou" in header
    # other concept data in the same folder is refused, not mixed
    b2 = build_concepts(tmp_path / "c2", images[:4], np.arange(4) % 3, ("a", "b", "c"), tmp_path / "t.npy",
                        textures_per_name=1)
    with pytest.raises(ValueError, match="other arguments"):
        dissect_to_dir(tiny_resnet, b2, ["layer1.2"], out, model_desc=desc, config=cfg)
    # FGSM with reused thresholds uses exactly the clean ones
    adv = dissect_to_dir(tiny_resnet, b, ["layer3.2"], out, model_desc=desc, config=cfg, attack="fgsm", eps=0.0112,
                         reuse_thresholds=True)
    np.testing.assert_array_equal(np.load(out / "layer3.2" / "fgsm-eps0.0112-reused" / "quantile.npy"), t3)
    assert adv["layer3.2"]["units"] == 64
    with pytest.raises(ValueError, match="unknown gate point 'layer9'"):
        dissect_to_dir(tiny_resnet, b, ["layer9"], out, model_desc=desc, config=cfg)


def test_cli_concepts_and_dissect(tmp_path, capsys):
    from PIL import Image

    from jaxroute.cli.main import main

    rng = np.random.default_rng(7)
    for c in ("cat", "dog"):
        d = tmp_path / "data" / "test" / c
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    table = _color_table(tmp_path / "t.npy")
    assert main(["concepts", "--data", str(tmp_path / "data"), "--split", "test", "--out", str(tmp_path / "c"),
                 "--color-table", str(table), "--textures-per-name", "1", "--data-dir", str(tmp_path / "cache"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 6 + len(TEXTURE_NAMES) and res["categories"] == ["object", "texture", "color"]
    caps = {c["label"]: c["cap"] for c in res["iou_caps"]}
    assert caps["cat"] == pytest.approx(0.005 / (3 / 17))
    assert main(["dissect", "--model", "resnet20", "--concepts", str(tmp_path / "c"), "--layer", "layer2.2",
                 "--out", str(tmp_path / "d"), "--json", "--quantile", "1.5"]) == 2
    assert main(["dissect", "--model", "resnet20", "--concepts", str(tmp_path / "nope"), "--layer", "layer2.2",
                 "--out", str(tmp_path / "d"), "--json"]) == 2


@pytest.mark.shared
def test_color_table_names(shared, tmp_path):
    from jaxroute.dissection.concepts import color_index, load_color_table

    table = load_color_table(shared / "data" / "color-names" / "w2color.npy")
    px = np.array([[[255, 0, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0], [255, 255, 0], [0, 200, 0]]], np.uint8)
    names = [COLOR_NAMES[i] for i in color_index(px, table)[0]]
    assert names == ["red", "blue", "white", "black", "yellow", "green"]


def test_textures_are_distinct():
    rng = np.random.default_rng(8)
    pats = {n: texture_pattern(n, 32, rng) for n in TEXTURE_NAMES}
    for n, p in pats.items():
        assert 0.05 < p.mean() < 0.95, n


# --------------------------------------------------------------------------- domain losses

def _np_cov(x):
    x = np.asarray(x, np.float64)
    n = len(x)
    mu = x.mean(0)
    return sum(np.outer(x[i] - mu, x[i] - mu) for i in range(n)) / (n - 1)


def _np_gaussian_mmd2(a, b, factors=(0.25, 0.5, 1, 2, 4)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    z = np.concatenate([a, b])
    d = [np.linalg.norm(z[i] - z[j]) for i in range(len(z)) for j in range(i + 1, len(z))]
    med = np.median(d)

    def k(x, y):
        return sum(np.exp(-np.sum((x - y) ** 2) / (2 * (med * f) ** 2)) for f in factors)

    n, m = len(a), len(b)
    kxx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_domain_losses_equal_float64_references():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(9, 5))
    b = rng.normal(0.3, 1.5, size=(7, 5))
    k = a.shape[1]
    with jax.enable_x64():
        A, B = jnp.asarray(a), jnp.asarray(b)
        d = _np_cov(a) - _np_cov(b)
        coral, mmd2 = jax.jit(domain.coral, static_argnames="norm"), jax.jit(domain.gaussian_mmd2)
        assert float(coral(A, B)) == pytest.approx(np.abs(d).sum() / k ** 2, rel=1e-12)
        assert float(coral(A, B, norm="fro2")) == pytest.approx((d ** 2).sum() / (4 * k ** 2), rel=1e-12)
        assert float(jax.jit(domain.linear_mmd)(A, B)) == pytest.approx(np.abs(a.mean(0) - b.mean(0)).sum() / k,
                                                                       rel=1e-12)
        assert float(mmd2(A, B)) == pytest.approx(_np_gaussian_mmd2(a, b), rel=1e-10)
        g = jax.jit(jax.grad(domain.make_domain_loss("gaussian_mmd")))(A, B)
        assert np.all(np.isfinite(np.asarray(g)))
        assert float(coral(A, A)) == 0.0
    # float32 with the default signature loss(clean, adv)
    for kind in domain.DOMAIN_LOSSES:
        v = jax.jit(domain.make_domain_loss(kind))(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        assert v.shape == () and np.isfinite(float(v))
    with pytest.raises(ValueError, match="norm"):
        domain.coral(a, b, norm="l2")
    with pytest.raises(ValueError, match="unknown domain loss"):
        domain.make_domain_loss("kl")
