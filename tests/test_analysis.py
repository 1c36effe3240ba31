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


def test_source_class_correlation_and_other_labelings():
    rng = np.random.default_rng(5)
    real = rng.random((6, 18))
    labels = np.array([0, 0, 1, 1, 2, 2])
    paths = class_mean_paths(real, labels, 3)
    adv = paths[[1, 2, 0, 2, 0, 1]] + 0.01 * rng.normal(size=(6, 18))  # adversarial gates ~ reached class's path
    c = layer_correlations(adv, real, np.array([1, 2, 0, 2, 0, 1]), paths, SPEC, source=labels)
    assert c["to_reached_class"].min() > 0.9 and c["to_source_class"].mean() < c["to_reached_class"].mean()
    with pytest.raises(ValueError, match="one row per adversarial"):
        layer_correlations(adv[:3], real, labels, paths, SPEC)
    # the same clusters scored against a second labeling
    y = np.repeat(np.arange(3), 30)
    x = rng.normal(size=(90, 18))
    x[:, 10:] += 4 * np.eye(3)[y] @ rng.normal(size=(3, 8))
    rows = {r["layer"]: r for r in layer_clustering_scores(x, y, SPEC, other_labels={"shuffled": rng.permutation(y)})}
    assert rows["c"]["kmeans_v_measure"] > 0.8 > 0.2 > rows["c"]["kmeans_v_measure_shuffled"]
    with pytest.raises(ValueError, match="labels"):
        layer_clustering_scores(x, y[:10], SPEC)


def test_cluster_summary_and_typical_order():
    from jaxroute.analysis import centroid_distance, cluster_summary

    x = np.array([[0.0, 0], [0.1, 0], [3.0, 0], [10, 0], [10, 1]])
    ids = np.array([0, 0, 0, 1, 1])
    d = centroid_distance(x, ids)
    np.testing.assert_allclose(d, [1.0333333, 0.9333333, 1.9666667, 0.5, 0.5], rtol=1e-6)
    rows = cluster_summary(ids, np.array([1, 1, 0, 0, 0], bool))
    assert rows == [{"cluster": 0, "size": 3, "accuracy": pytest.approx(2 / 3)},
                    {"cluster": 1, "size": 2, "accuracy": 0.0}]


def test_protocol_draws_do_not_depend_on_other_sizes_and_score_extra_tests():
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(3), 20)
    tr_real, tr_adv = rng.normal(0, 1, (60, 6)), rng.normal(1.0, 1, (60, 6))
    te_real, te_adv = rng.normal(0, 1, (30, 6)), rng.normal(1.0, 1, (30, 6))
    kw = dict(runs=2, classifiers=("random_forest",), seed=3)
    both = evaluate_protocol(tr_real, tr_adv, labels, te_real, te_adv, sizes=(5, 10), **kw,
                             extra_tests={"same": (te_real, te_adv), "easy": (te_real, te_adv + 5)})
    alone = evaluate_protocol(tr_real, tr_adv, labels, te_real, te_adv, sizes=(10,), **kw)
    assert both[1]["aucs"] == alone[0]["aucs"]
    assert both[1]["extra"]["same"]["auc_mean"] == pytest.approx(both[1]["auc_mean"])
    assert both[1]["extra"]["easy"]["auc_mean"] > both[1]["auc_mean"]
    with pytest.raises(ValueError, match="twin"):
        evaluate_protocol(tr_real, tr_adv[:50], labels, te_real, te_adv, sizes=(5,), **kw)
