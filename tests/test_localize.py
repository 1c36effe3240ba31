"""Weakly supervised localization on paste sets (jaxroute.explain.localize, `jaxroute localize`):
the result's structure, all-ones subnetworks = full weights, the maps are those of the canvases'
classes, and bad input is refused (one line, exit 2 on the command line)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxroute.data.paste import paste_set
from jaxroute.explain import SmoothGradConfig, explain
from jaxroute.explain.localization import ALPHAS, evaluate_localization
from jaxroute.explain.localize import canvas_shape, localize
from jaxroute.models import GatedModel, create_model, default_meta

KEYS = {"alpha_star", "err", "energy_in_box", "train_err"}


@pytest.fixture(scope="module")
def digits():
    """A randomly initialised digits CNN (global pooling: it takes the 16x16 canvases of 8x8 digits) and
    (train images, labels), (test images, labels)."""
    from jaxroute.data import load_dataset
    from jaxroute.weights import load_model

    model = load_model("digits_cnn", None, key=jax.random.key(3))
    train, test = (load_dataset("digits", split, limit=40) for split in ("train", "test"))
    return model, (train.images, train.labels), (test.images, test.labels)


def check_structure(res, methods, variants):
    assert list(res) == methods
    for m in methods:
        assert set(res[m]) == set(variants)
        for v in variants:
            r = res[m][v]
            assert set(r) == KEYS
            assert r["alpha_star"] in ALPHAS
            assert 0 <= r["err"] <= 100 and 0 <= r["train_err"] <= 100 and 0 <= r["energy_in_box"] <= 1


def test_structure_all_ones_subnets_and_maps_of_the_pasted_class(digits):
    model, (xtr, ytr), (xte, yte) = digits
    key = jax.random.key(7)
    methods = ["grad_cam", "smoothgrad"]  # the gradient: the command-line test
    ones = np.ones((model.num_classes, model.spec.size), np.float32)
    res = localize(model, xtr, ytr, xte, yte, methods=methods, subnets=ones, n_train=4, n_test=4, key=key,
                   batch_size=4, configs={"smoothgrad": SmoothGradConfig(samples=2)})
    check_structure(res, methods, ["full", "subnet"])
    for m in methods:
        for k in KEYS:  # gates of 1 change nothing (SmoothGrad: the same noise for both)
            np.testing.assert_allclose(res[m]["subnet"][k], res[m]["full"][k], rtol=1e-6, atol=1e-6)
    # the numbers are those of the pasted class's maps on the documented canvases
    k_train, k_test, _ = jax.random.split(key, 3)
    tr = paste_set(k_train, xtr, ytr, 4, 16)
    te = paste_set(k_test, xte, yte, 4, 16)
    maps = jax.jit(lambda x, t: explain(model, None, x, t, method="grad_cam").maps)
    want = evaluate_localization(maps(tr.canvases, tr.labels), tr.boxes, maps(te.canvases, te.labels), te.boxes)
    for k in KEYS:
        np.testing.assert_allclose(res["grad_cam"]["full"][k], want[k], rtol=1e-5, atol=1e-6)


def test_cache_dir_resumes_chunk_by_chunk_with_the_same_result(digits, tmp_path):
    model, (xtr, ytr), (xte, yte) = digits
    kw = dict(methods=["smoothgrad"], n_train=6, n_test=5, key=jax.random.key(2), batch_size=4,
              configs={"smoothgrad": SmoothGradConfig(samples=2)})
    gates = np.random.default_rng(0).uniform(0, 2, (model.num_classes, model.spec.size)).astype(np.float32)
    want = localize(model, xtr, ytr, xte, yte, subnets=gates, **kw)
    cache = tmp_path / "loc"
    assert localize(model, xtr, ytr, xte, yte, subnets=gates, cache_dir=cache, chunk=4, **kw) == want
    folder = cache / "smoothgrad-subnet"
    assert sorted(p.name for p in folder.glob("*.npz")) == ["test-0000000-0000004.npz", "test-0000004-0000005.npz",
                                                            "train-0000000-0000004.npz", "train-0000004-0000006.npz"]
    # a killed run: the chunks it kept are read back, the missing one computed again
    (folder / "test-0000004-0000005.npz").unlink()
    kept = folder / "train-0000000-0000004.npz"
    before = kept.stat().st_mtime_ns
    assert localize(model, xtr, ytr, xte, yte, subnets=gates, cache_dir=cache, chunk=4, **kw) == want
    assert kept.stat().st_mtime_ns == before and (folder / "test-0000004-0000005.npz").exists()
    # scores of other gates, another key or another model are refused, not mixed
    with pytest.raises(ValueError, match="gates"):
        localize(model, xtr, ytr, xte, yte, subnets=gates * 0.5, cache_dir=cache, chunk=4, **kw)
    with pytest.raises(ValueError, match="key"):
        localize(model, xtr, ytr, xte, yte, subnets=gates, cache_dir=cache, chunk=4, **{**kw, "key": jax.random.key(3)})
    with pytest.raises(ValueError, match="canvases"):
        localize(model, xtr, ytr, xte[::-1], yte[::-1], subnets=gates, cache_dir=cache, chunk=4, **kw)
    other = model.with_variables(jax.tree_util.tree_map(lambda v: v * 1.01, model.variables))
    with pytest.raises(ValueError, match="weights"):
        localize(other, xtr, ytr, xte, yte, subnets=gates, cache_dir=cache, chunk=4, **kw)


def abstract_model(name):
    from jaxroute.weights import abstract_variables

    module = create_model(name)
    return GatedModel(module, abstract_variables(module, (32, 32, 3)), default_meta(name, source="test"))


def test_bad_input(digits):
    model, (xtr, ytr), (xte, yte) = digits
    kw = dict(n_train=2, n_test=2, key=jax.random.key(0), batch_size=2)
    with pytest.raises(ValueError, match="unknown saliency method"):
        localize(model, xtr, ytr, xte, yte, methods=["gradient", "lime"], **kw)
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        localize(model, xtr, ytr, xte, yte, methods=["gradient"], **{**kw, "n_train": 0})
    with pytest.raises(ValueError, match="subnets must have shape"):
        localize(model, xtr, ytr, xte, yte, methods=["gradient"], subnets=np.ones((10, 7)), **kw)
    with pytest.raises(ValueError, match="out of range"):
        localize(model, xtr, ytr + 10, xte, yte, methods=["gradient"], **kw)
    with pytest.raises(ValueError, match="test images must have shape"):
        localize(model, xtr, ytr, xte[:, :4], yte, methods=["gradient"], **kw)
    # the global-pooling CIFAR ResNets take 64x64 canvases; a classifier over a fixed 1x1x512 feature
    # map (no global pooling) cannot (shapes only: no weights needed)
    assert canvas_shape(abstract_model("resnet20"), (32, 32)) == (64, 64, 3)
    with pytest.raises(ValueError, match="model vgg16_bn_cifar cannot take the 64x64 paste-set canvases"):
        canvas_shape(abstract_model("vgg16_bn_cifar"), (32, 32))


def save_subnets(path, gates):
    """A subnets.npz as ``jaxroute subnet`` writes it (one snapshot), with the given gates."""
    from jaxroute.routing.subnet import Subnets

    k, _ = gates.shape
    s = Subnets(gates=gates, sparsity=np.mean(gates > 0, 1), selected_epoch=np.ones(k, int),
                fallback=np.zeros(k, bool), classes=np.arange(k), snapshot_gates=gates[None],
                snapshot_loss=np.zeros((1, k)), snapshot_sparsity=np.mean(gates > 0, 1)[None],
                train_loss=np.zeros((1, k)))
    np.savez(path / "subnets.npz", **s._asdict())


def test_cli_localize_digits(tmp_path, capsys):
    """`jaxroute localize` on the digits CNN (random weights, 16x16 canvases of 8x8 digits)."""
    from jaxroute.cli.main import main

    base = ["localize", "--model", "digits_cnn", "--data", "digits", "--limit", "40", "--n-train", "6",
            "--n-test", "6", "--batch-size", "6", "--smoothgrad-samples", "2", "--json"]
    methods = ["gradient"]
    d = 32 + 64 + 128
    save_subnets(tmp_path, np.ones((10, d), np.float32))
    assert main(base + ["--methods", ",".join(methods), "--subnets", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n_train"] == 6 and res["n_test"] == 6 and res["seconds"] > 0
    check_structure({m: res[m] for m in methods}, methods, ["full", "subnet"])
    for m in methods:
        for k in KEYS:  # all-ones subnetworks = the full model
            np.testing.assert_allclose(res[m]["subnet"][k], res[m]["full"][k], rtol=1e-6, atol=1e-6)
    # bad input: one line, exit 2
    save_subnets(tmp_path, np.ones((10, d + 1), np.float32))
    assert main(base + ["--methods", "gradient", "--subnets", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gates per subnetwork" in err[0]
    assert main(base + ["--methods", "gradient,lime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown saliency method" in err[0]
    assert main(base + ["--methods", "gradient", "--n-train", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-train must be >= 1" in err[0]
