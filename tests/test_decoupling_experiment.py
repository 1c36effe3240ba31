"""The decoupling experiment's analyses (experiments/decoupling.py: Table 4, Fig. 3, Fig. 7):
their library pieces and configuration, a tiny end-to-end run on a random decoupled digits CNN
(fast), and the whole command on CIFAR-10 with the pretrained ResNet-20 (slow)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_decoupling_route import random_decoupled

from experiments.decoupling import AnalysisConfig, analyse, analysis_lines, dgr_rows
from jaxroute.analysis import embed_paths, first_per_class, layer_fractions, load_first_per_class
from jaxroute.attacks import BIMConfig, cached_attack_dataset
from jaxroute.decoupling.model import calculation_paths, dataset_paths
from jaxroute.models.gates import GateSpec, flatten_gates


# ---------------------------------------------------------------- pure pieces
def test_first_per_class_keeps_the_original_order():
    labels = np.array([2, 0, 0, 1, 2, 0, 1, 2, 1])
    np.testing.assert_array_equal(first_per_class(labels, 2, 3), [0, 1, 2, 3, 4, 6])
    np.testing.assert_array_equal(first_per_class(labels, 3, 3), np.arange(9))
    with pytest.raises(ValueError, match=r"need 4 images of each of 3 classes.*\[3, 3, 3\]"):
        first_per_class(labels, 4, 3)
    with pytest.raises(ValueError, match="integer >= 1"):
        first_per_class(labels, 0, 3)


def test_load_first_per_class_reads_the_first_n_of_each_class():
    from jaxroute.data import load_dataset

    whole = load_dataset("digits", "test")
    got = load_first_per_class("digits", "test", 3)  # digits' order does not interleave exactly: read whole
    idx = first_per_class(whole.labels, 3, 10)
    np.testing.assert_array_equal(got.labels, whole.labels[idx])
    np.testing.assert_array_equal(got.images, whole.images[idx])
    assert tuple(got.class_names) == tuple(whole.class_names)
    with pytest.raises(ValueError, match="integer >= 1"):
        load_first_per_class("digits", "test", 0)


def test_layer_fractions_per_layer():
    spec = GateSpec(("a", "b"), (2, 4))
    paths = np.array([[1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], np.uint8)
    np.testing.assert_allclose(layer_fractions(paths, spec), [[0.5, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        layer_fractions(paths[:, :5], spec)


def test_embed_paths_reduces_then_embeds():
    rng = np.random.default_rng(0)
    paths = (rng.random((20, 30)) > 0.5).astype(np.uint8)
    xy = embed_paths(paths, pca_dims=5, seed=0)
    assert xy.shape == (20, 2) and np.isfinite(xy).all() and np.ptp(xy, axis=0).all()
    np.testing.assert_array_equal(embed_paths(np.ones((10, 30)), seed=0), np.zeros((10, 2)))  # one path for all
    with pytest.raises(ValueError, match="N >= 3"):
        embed_paths(paths[:2])
    with pytest.raises(ValueError, match="pca_dims"):
        embed_paths(paths, pca_dims=0)


def test_analysis_config_names_the_bad_field():
    assert AnalysisConfig().sizes == (10, 50, 100) and AnalysisConfig().test_per_class == 100
    for kw, msg in (({"sizes": (10, 300)}, "exceeds the training pool"), ({"eps": float("nan")}, "eps"),
                    ({"runs": 0}, "runs"), ({"classifiers": ("svm",)}, "classifiers"),
                    ({"test_per_class": 0}, "test_per_class"), ({"target": "dog"}, "two different classes")):
        with pytest.raises(ValueError, match=msg):
            AnalysisConfig(**kw)


def test_dgr_rows_only_for_the_same_protocol(tmp_path):
    cfg = AnalysisConfig(test_per_class=5, train_per_class=10, sizes=(1, 5), runs=2)
    rows = {"cdrp": [{"per_class": 1}], "features": [{"per_class": 1}]}
    conf = {"test_per_class": 5, "train_per_class": 10, "sizes": [1, 5], "runs": 2, "seed": 0, "eps": 0.01,
            "attack_steps": 10, "classifiers": ["random_forest", "adaboost", "gradient_boosting"]}
    f = tmp_path / "cdrp.json"
    f.write_text(json.dumps({"config": conf, "detection": rows}))
    assert dgr_rows(f, cfg)[0] == rows
    f.write_text(json.dumps({"config": {**conf, "runs": 5}, "detection": rows}))
    got, note = dgr_rows(f, cfg)
    assert got is None and "'runs': (5, 2)" in note
    assert dgr_rows(tmp_path / "none.json", cfg) == (None, f"{(tmp_path / 'none.json').resolve()} not found: no DGR rows")


def test_cached_attack_dataset_reads_its_file_back(tmp_path):
    w = jax.random.normal(jax.random.key(0), (12, 3))
    f = lambda x: x.reshape(len(x), -1) @ w  # noqa: E731
    x = np.random.default_rng(0).random((4, 2, 2, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 0])
    a = cached_attack_dataset(f, tmp_path, "set", x, labels, attack="bim", config=BIMConfig(eps=0.05, steps=3),
                              targets=np.array([1, 2, 0, 1]), orig_index=[7, 8, 9, 10], class_names="abc")
    assert (tmp_path / "set.npz").is_file() and a["orig_index"].tolist() == [7, 8, 9, 10]
    assert np.abs(a["images"] - x).max() <= 0.15 + 1e-6 and a["class_names"].tolist() == ["a", "b", "c"]
    b = cached_attack_dataset(f, tmp_path, "set", x * 0, labels, attack="bim")  # cached: not attacked again
    np.testing.assert_array_equal(a["images"], b["images"])


def test_dataset_paths_are_the_flat_eval_paths_and_features():
    model = random_decoupled()
    x = np.asarray(jax.random.uniform(jax.random.key(1), (5, *model.input_shape)))
    got = dataset_paths(model, x, batch_size=4)
    np.testing.assert_array_equal(got["paths"], np.asarray(flatten_gates(model.spec, calculation_paths(model, x))))
    cap = model.capture(x)
    np.testing.assert_allclose(got["features"], np.asarray(cap.features).reshape(5, -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["pred"], np.argmax(np.asarray(cap.logits), -1))
    assert got["paths"].dtype == np.uint8 and len(np.unique(got["paths"], axis=0)) > 1


# ---------------------------------------------------------------- the analyses end to end
def test_analyses_end_to_end_on_digits(tmp_path):
    model = random_decoupled()
    cfg = AnalysisConfig(data="digits", test_per_class=3, train_per_class=4, sizes=(1, 2), runs=2,
                         classifiers=("random_forest",), attack_steps=2, eps=0.05, batch_size=32, pca_dims=8,
                         source="5", target="9", cdrp_report=str(tmp_path / "absent.json"))
    res = analyse(model, cfg, tmp_path, log=lambda m: None)
    t4, f3, f7 = res["table4"], res["fig3"], res["fig7"]
    assert t4["attacks"]["test"]["n"] == 30 and t4["attacks"]["train"]["n"] == 40
    assert {r["per_class"] for r in t4["detection"]["path"]} == {1, 2} and t4["dgr"] is None
    assert all(0 <= r["auc_mean"] <= 1 for feat in t4["detection"].values() for r in feat)
    assert f3["n"] == 30 and f3["dims"] == model.spec.size and 0 <= f3["kmeans_v_measure"] <= 1
    assert f7["attacked"] == 3 and len(f7["fraction_on"]["mean 5"]) == len(model.spec.names)
    if f7["chosen"] is not None:
        assert set(f7["correlation"]) == {"adversarial vs mean 5", "adversarial vs mean 9", "5 image vs mean 5"}
        assert (tmp_path / "fig7_5_9.png").is_file()
    for name in ("table4", "fig3", "fig7"):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == res[name]
    for name in ("test_perm", "train_perm", "fig7_5_9"):
        assert (tmp_path / "cache" / "adv" / f"{name}.npz").is_file()
    assert (tmp_path / "fig3_paths_tsne.png").is_file()
    text = "\n".join(analysis_lines(res, cfg))
    assert "(Table 4)" in text and "(Fig. 3)" in text and "(Fig. 7)" in text and "| 2 | calculation path" in text
    # a second run reads every stage back; other arguments are refused
    assert analyse(model, cfg, tmp_path, log=lambda m: None) == res
    with pytest.raises(ValueError, match="other arguments"):
        analyse(model, AnalysisConfig(**{**cfg.__dict__, "runs": 3}), tmp_path)


@pytest.mark.slow
def test_whole_command_on_cifar10(shared, tmp_path, capsys):
    from experiments.decoupling import main

    out = tmp_path / "dec"
    assert main(["--out", str(out), "--limit", "64", "--frozen-epochs", "1", "--epochs", "1", "--batch-size", "32",
                 "--no-speed", "--test-per-class", "2", "--train-per-class", "3", "--sizes", "1,3", "--runs", "2",
                 "--attack-steps", "2"]) == 0
    readme = (out / "README.md").read_text()
    for section in ("## Filters per layer (Fig. 4)", "(Table 4)", "(Fig. 3)", "(Fig. 7)"):
        assert section in readme
    for name in ("decoupled", "control", "table4", "fig3", "fig7"):
        assert (out / f"{name}.json").is_file()
    assert (out / "fig3_paths_tsne.png").is_file()
