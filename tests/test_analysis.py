"""CDRP analysis and detection modules (numpy / scikit-learn)."""
import json

import numpy as np
import pytest

from jaxroute.analysis import (
    class_mean_paths, cluster_class, layer_clustering_scores, layer_correlations, rowwise_corr, split_layers,
)
from jaxroute.detection import (
    Detector, TreeDetector, detection_auc, evaluate_outputs, evaluate_protocol, paired_features, real_vs_adv,
    scalar_aucs,
)
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
        det = TreeDetector(name, seed=0).fit(x[::2], y[::2])
        assert isinstance(det, TreeDetector)                      # fit returns the detector
        scores = det.score(x[1::2])
        assert scores.shape == (200,) and scores.min() >= 0 and scores.max() <= 1   # probabilities
        auc = detection_auc(det, x[1::2], y[1::2])
        assert 0.85 < auc <= 1.0
    same = TreeDetector("random_forest", seed=0).fit(*real_vs_adv(real[:100], rng.normal(0, 1, (100, 10))))
    assert 0.35 < detection_auc(same, *real_vs_adv(real[100:], rng.normal(0, 1, (100, 10)))) < 0.65
    with pytest.raises(ValueError, match="NaN"):
        TreeDetector("adaboost", seed=0).fit(np.full((4, 2), np.nan), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="unknown classifier"):
        TreeDetector("svm", seed=0)


def test_tree_detector_contract():
    rng = np.random.default_rng(7)
    x, y = real_vs_adv(rng.normal(0, 1, (40, 4)), rng.normal(1, 1, (40, 4)))
    with pytest.raises(RuntimeError, match="fit the detector before scoring"):
        TreeDetector().score(x)
    with pytest.raises(ValueError, match="both real"):
        TreeDetector().fit(x[:40], y[:40])                          # only real samples
    with pytest.raises(ValueError, match="0 \\(real\\) / 1"):
        TreeDetector().fit(x, y * 2)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        TreeDetector().fit(x[:, 0], y)
    # the same seed gives the same detector
    a = TreeDetector("random_forest", seed=5).fit(x, y).score(x)
    np.testing.assert_array_equal(TreeDetector("random_forest", seed=5).fit(x, y).score(x), a)


def test_any_detector_with_fit_and_score_is_evaluated_the_same_way():
    class MeanDistance:
        """Distance to the mean of the real training rows (unsupervised: uses y only to pick them)."""

        def fit(self, x, y):
            self.mu = np.asarray(x)[np.asarray(y) == 0].mean(0)
            return self

        def score(self, x):
            return np.linalg.norm(np.asarray(x) - self.mu, axis=1)

    rng = np.random.default_rng(8)
    x, y = real_vs_adv(rng.normal(0, 1, (100, 6)), rng.normal(0, 3, (100, 6)))
    det: Detector = MeanDistance().fit(x[::2], y[::2])
    assert detection_auc(det, x[1::2], y[1::2]) > 0.9


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


def test_dense_paths_and_class_paths():
    from jaxroute.analysis import class_paths_from, dense, path_stats

    d = {"cdrp": np.array([[1.0, 2], [0, 1], [3, 4], [0, 0]]), "label": np.array([0, 0, 1, 1]),
         "pred": np.array([0, 1, 1, 1]), "loss": np.array([0.1, 2e3, 5.0, 1.0]),
         "fell_back": np.array([False, False, True, False])}
    assert dense(d).tolist() == [True, False, True, False]
    assert path_stats(d) == {"dense_fraction": 0.5, "accuracy_dense": 1.0, "accuracy_not_dense": 0.5,
                             "loss_above_1000": 1}
    paths, notes = class_paths_from(d, 3)
    np.testing.assert_array_equal(paths[0], [1, 2])  # image 1 is misclassified
    np.testing.assert_array_equal(paths[1], [0, 0])  # image 2 fell back
    assert np.isnan(paths[2]).all() and notes == []
    d["pred"] = np.array([1, 1, 1, 1])
    paths, notes = class_paths_from(d, 2)
    np.testing.assert_array_equal(paths[0], [0.5, 1.5])  # no correct image: mean over all of the class
    assert notes == ["class 0: no correctly classified image, mean over all its images"]


def test_per_class_counts():
    from jaxroute.analysis import per_class_counts

    assert per_class_counts([0, 2, 2], 4).tolist() == [1, 0, 2, 0]


def test_depth_trend_and_neighbour_fraction():
    from jaxroute.analysis import depth_trend, neighbour_fraction

    rows = [{"v": v, "flat": 0.5} for v in (0.1, 0.2, 0.15, 0.4, 0.5)]
    parts = {"all": np.ones(5, bool), "even": np.arange(5) % 2 == 0, "odd": np.arange(5) % 2 == 1}
    tr = depth_trend(rows, ("v", "flat"), parts)
    assert tr["v"]["all"]["spearman_rho"] == pytest.approx(0.9) and tr["v"]["even"]["spearman_rho"] == 1.0
    assert "odd" not in tr["v"]  # two layers: too few for a trend
    assert tr["flat"]["all"] == {"spearman_rho": None, "p_value": None, "layers": 5}
    xy = np.r_[np.zeros((12, 2)), np.ones((12, 2)) * 10] + np.random.default_rng(0).normal(0, 0.1, (24, 2))
    member = np.arange(24) < 12
    assert neighbour_fraction(xy, member) == 1.0 and neighbour_fraction(xy, member, k=3) == 1.0
    with pytest.raises(ValueError, match="membership"):
        neighbour_fraction(xy, member[:5])


def test_scalar_scores_separate_a_shifted_set():
    from jaxroute.detection import SCALAR_SCORES, scalar_aucs

    rng = np.random.default_rng(7)

    def routed(shift):
        return {"cdrp": rng.random((20, 6)) + shift, "features": rng.normal(shift, 1, (20, 2, 2)),
                "full_logits": rng.normal(0, 1, (20, 10)) + 5 * shift * np.eye(10)[rng.integers(0, 10, 20)]}

    aucs = scalar_aucs(routed(0.0), routed(2.0))
    assert list(aucs) == list(SCALAR_SCORES)
    assert aucs["CDRP L1 norm"] == 1.0 and aucs["max logit"] > 0.9
    assert scalar_aucs(routed(2.0), routed(0.0))["CDRP L1 norm"] == 0.0


def test_plots_write_png_files(tmp_path):
    from jaxroute.analysis.plots import plot_clusters, plot_correlations, plot_embeddings, plot_layer_scores
    from jaxroute.detection.plots import plot_detection
    from jaxroute.routing.plots import plot_ablation, plot_layer_sparsity

    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(3), 10)
    plot_embeddings({n: rng.normal(size=(30, 2)) for n in SPEC.names}, labels, ["x", "y", "z"],
                    tmp_path / "emb.png", "t", cols=2)
    plot_layer_scores(layer_clustering_scores(rng.normal(size=(30, 18)), labels, SPEC), tmp_path / "scores.png")
    plot_clusters(rng.random((30, 4, 4, 3)), labels, tmp_path / "clusters.png", per_cluster=4,
                  mark=labels == 1, row_notes=["a", "b", "c"])
    corr = {k: rng.random((5, 3)) for k in ("to_original", "to_reached_class", "to_source_class")}
    plot_correlations({"s1": corr, "s2": corr}, SPEC, tmp_path / "corr.png", "t", reference=rng.random((4, 3)))
    rows = [{"per_class": s, "classifier": c, "auc_mean": 0.8, "auc_std": 0.1}
            for s in (2, 4) for c in ("random_forest", "adaboost")]
    plot_detection({"a": {"cdrp": rows, "features": rows}}, tmp_path / "det.png")
    with pytest.raises(ValueError, match="at most"):
        plot_detection({"a": {"cdrp": rows}}, tmp_path / "x.png", feature_labels={str(i): "" for i in range(5)})
    curve = {"fractions": [0, 0.5, 1], "order": "top", "top1": [0.9, 0.5, 0.1], "top5": [1, 0.8, 0.3]}
    plot_ablation([curve], tmp_path / "ablation.png")
    plot_layer_sparsity({"DGR": {"a": 0.2, "b": 0.5, "c": 0.9}}, SPEC, tmp_path / "sparsity.png")
    for f in ("emb", "scores", "clusters", "corr", "det", "ablation", "sparsity"):
        assert (tmp_path / f"{f}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f


def test_analysis_imports_without_matplotlib_and_plots_keep_the_backend():
    import subprocess
    import sys

    code = ("import sys, jaxroute.analysis, jaxroute.detection, jaxroute.routing.plots\n"
            "assert not [m for m in sys.modules if m.startswith('matplotlib')], 'matplotlib imported'\n"
            "import matplotlib, numpy as np, tempfile, os\n"
            "matplotlib.rcParams['backend'] = 'pdf'\n"
            "from jaxroute.routing.plots import plot_ablation\n"
            "c = {'fractions': [0, 1], 'order': 'top', 'top1': [1, 0], 'top5': [1, 0]}\n"
            "plot_ablation([c], os.path.join(tempfile.mkdtemp(), 'a.png'))\n"
            "assert matplotlib.get_backend() == 'pdf', matplotlib.get_backend()\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])  # this checkout's jaxroute, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def _write_output(root, index, labels, cdrp, features, job=None, extra=None):
    """A minimal extraction output: manifest.json and one plain-numpy shard."""
    root.mkdir(parents=True)
    manifest = {"job": {"model": "m", "method": "dgr", "data": "d", "split": "test", "limit": None, **(job or {})},
                "extra": extra or {"cdrp_size": cdrp.shape[1]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    np.savez(root / "shard-00000.npz", index=np.asarray(index), label=np.asarray(labels), cdrp=cdrp,
             features=features)
    return root


def test_paired_features_checks_twins():
    real = {"index": np.arange(4), "cdrp": np.ones((4, 2, 3))}
    adv = {"index": np.arange(4), "cdrp": np.zeros((4, 2, 3))}
    r, a = paired_features(real, adv, "cdrp")
    assert r.shape == a.shape == (4, 6)                               # flattened per sample
    with pytest.raises(ValueError, match="twin"):
        paired_features(real, {**adv, "index": np.array([0, 1, 3, 2])}, "cdrp")
    with pytest.raises(ValueError, match="twin"):
        paired_features(real, {"index": np.arange(3), "cdrp": np.zeros((3, 6))}, "cdrp", "test ")
    with pytest.raises(ValueError, match="feature 'features' is not in the outputs"):
        paired_features(real, adv, "features")


def test_evaluate_outputs_from_extraction_directories(tmp_path):
    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(3), 20)
    dirs = {}
    for split, n in (("train", 60), ("test", 30)):
        y = labels[:n]
        for kind, shift in (("real", 0.0), ("adv", 1.5)):
            dirs[f"{split}_{kind}"] = _write_output(
                tmp_path / f"{split}-{kind}", np.arange(n), y, rng.normal(shift, 1, (n, 8)),
                rng.normal(0, 1, (n, 5)), job={"split": split, "data": kind})
    args = (dirs["train_real"], dirs["train_adv"], dirs["test_real"], dirs["test_adv"])
    kw = dict(sizes=(5, 10), runs=2, classifiers=("random_forest",), seed=1)
    rows = evaluate_outputs(*args, **kw)
    assert [(r["per_class"], r["classifier"]) for r in rows] == [(5, "random_forest"), (10, "random_forest")]
    assert all(r["auc_mean"] > 0.8 for r in rows)                     # the CDRPs differ
    feats = evaluate_outputs(*args, feature="features", **kw)
    assert all(0.2 < r["auc_mean"] < 0.8 for r in feats)              # the features do not
    # the same images, the same draws: equal to the protocol on the arrays themselves
    load = lambda d: np.load(d / "shard-00000.npz")["cdrp"]           # noqa: E731
    ref = evaluate_protocol(load(dirs["train_real"]), load(dirs["train_adv"]), labels, load(dirs["test_real"]),
                            load(dirs["test_adv"]), **kw)
    assert [r["aucs"] for r in rows] == [r["aucs"] for r in ref]
    # outputs routed with other settings are refused (data, split and limit may differ)
    other = _write_output(tmp_path / "other", np.arange(30), labels[:30], rng.normal(0, 1, (30, 8)),
                          rng.normal(0, 1, (30, 5)), job={"method": "awr", "split": "test"})
    with pytest.raises(ValueError, match="different settings.*method: 'dgr' vs 'awr'"):
        evaluate_outputs(dirs["train_real"], dirs["train_adv"], dirs["test_real"], other, **kw)


def test_scalar_scores():
    rng = np.random.default_rng(10)
    n = 50

    def routed(norm, gates_on):
        f = rng.normal(0, 1, (n, 8))
        f *= norm / np.linalg.norm(f, axis=1, keepdims=True)
        return {"features": f, "full_logits": rng.normal(0, 1, (n, 4)),
                "cdrp": (rng.random((n, 20)) < gates_on).astype(np.float32)}

    aucs = scalar_aucs(routed(1.0, 0.3), routed(2.0, 0.3))
    assert aucs["penultimate L2 norm"] == 1.0                          # adversarial norms are all larger
    assert 0.3 < aucs["CDRP fraction of gates > 0"] < 0.7
    assert scalar_aucs(routed(1.0, 0.6), routed(1.0, 0.2))["CDRP fraction of gates > 0"] < 0.05
