"""CDRP analysis and detection modules (numpy / scikit-learn)."""
import numpy as np
import pytest

from jaxroute.analysis import (
    class_mean_paths, cluster_class, layer_clustering_scores, layer_correlations, rowwise_corr, split_layers,
)
from jaxroute.detection import detection_auc, evaluate_protocol, fit_detector, real_vs_adv
from jaxroute.models import GateSpec

SPEC = GateSpec(("a", "b", "c"), (4, 6, 8))


def test_rowwise_corr_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    ref = [np.corrcoef(a[i], b[i])[0, 1] for i in range(5)]
    np.testing.assert_allclose(rowwise_corr(a, b), ref, rtol=1e-12)
    assert rowwise_corr(np.ones((1, 3)), a[:1, :3])[0] == 0.0  # constant row: defined as 0


def test_split_layers_checks_layout():
    x = np.arange(2 * 18).reshape(2, 18)
    parts = split_layers(x, SPEC)
    assert [p.shape[1] for p in parts.values()] == [4, 6, 8]
    np.testing.assert_array_equal(parts["b"], x[:, 4:10])
    with pytest.raises(ValueError, match=r"\(N, 18\)"):
        split_layers(x[:, :10], SPEC)


def test_layer_scores_find_the_informative_layer():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(size=(90, 18))
    x[:, 10:] += 4 * np.eye(3)[y] @ rng.normal(size=(3, 8))  # only layer "c" carries the class
    rows = {r["layer"]: r for r in layer_clustering_scores(x, y, SPEC)}
    assert rows["c"]["kmeans_v_measure"] > 0.8 > 0.3 > rows["a"]["kmeans_v_measure"]
    assert rows["c"]["agglomerative_v_measure"] > 0.8


def test_layer_correlations_and_class_paths():
    rng = np.random.default_rng(1)
    orig = rng.random((6, 18))
    paths = class_mean_paths(orig, np.array([0, 0, 1, 1, 2, 2]), 4)
    assert np.isnan(paths[3]).all()
    c = layer_correlations(orig, orig, np.array([0, 0, 1, 1, 2, 2]), paths, SPEC)
    np.testing.assert_allclose(c["to_original"], 1.0)
    assert c["to_reached_class"].shape == (6, 3)
    with pytest.raises(ValueError, match="no real-image paths"):
        layer_correlations(orig, orig, np.array([3, 0, 0, 0, 0, 0]), paths, SPEC)


def test_cluster_class_orders_by_size():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 0.1, (3, 5)), rng.normal(5, 0.1, (9, 5))])
    ids = cluster_class(x, 2)
    assert np.bincount(ids).tolist() == [9, 3] and set(ids[:3]) == {1}


def test_detectors_auc_from_probabilities():
    rng = np.random.default_rng(3)
    real, adv = rng.normal(0, 1, (200, 10)), rng.normal(0.8, 1, (200, 10))
    x, y = real_vs_adv(real, adv)
    for name in ("random_forest", "adaboost", "gradient_boosting"):
        det = fit_detector(name, x[::2], y[::2], seed=0)
        auc = detection_auc(det, x[1::2], y[1::2])
        assert 0.85 < auc <= 1.0
    same = fit_detector("random_forest", *real_vs_adv(real[:100], rng.normal(0, 1, (100, 10))), seed=0)
    assert 0.35 < detection_auc(same, *real_vs_adv(real[100:], rng.normal(0, 1, (100, 10)))) < 0.65
    with pytest.raises(ValueError, match="NaN"):
        fit_detector("adaboost", np.full((4, 2), np.nan), np.array([0, 1, 0, 1]), seed=0)
    with pytest.raises(ValueError, match="unknown classifier"):
        fit_detector("svm", x, y, seed=0)


def test_protocol_rows():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 20)
    tr_real, tr_adv = rng.normal(0, 1, (60, 6)), rng.normal(1.5, 1, (60, 6))
    te_real, te_adv = rng.normal(0, 1, (30, 6)), rng.normal(1.5, 1, (30, 6))
    rows = evaluate_protocol(tr_real, tr_adv, labels, te_real, te_adv, sizes=(5, 10), runs=2,
                             classifiers=("random_forest",))
    assert [(r["per_class"], r["classifier"]) for r in rows] == [(5, "random_forest"), (10, "random_forest")]
    assert all(r["auc_mean"] > 0.8 and r["auc_std"] >= 0 for r in rows)
