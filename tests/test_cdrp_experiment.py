"""The CDRP analysis experiment (experiments/cdrp_analysis.py): the library pieces it is built on
and its configuration (fast), and a tiny end-to-end run on the pretrained ResNet-20 and real
CIFAR-10 JPEGs (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.cdrp_analysis import Config
from jaxroute.analysis import attack_correlations, choose_pairs, correlation_matrix, derangement, wordnet_distances
from jaxroute.models import GateSpec
from jaxroute.utils.cache import check_cache_config

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_wordnet_distances_on_the_shared_hierarchy(shared_dir):
    wn = shared_dir / "data" / "wordnet"
    if not wn.is_dir():
        pytest.skip(f"needs {wn}")
    dist, wnids, lch = wordnet_distances(wn, CIFAR10)
    assert dist.shape == (10, 10) and np.array_equal(dist, dist.T) and not np.diag(dist).any()
    ix = {c: i for i, c in enumerate(CIFAR10)}
    # domestic cat and dog are both domestic animals, car and truck motor vehicles: 1 + 1 edges each
    assert dist[ix["cat"], ix["dog"]] == 2 and "domestic animal" in lch[ix["cat"]][ix["dog"]]
    assert dist[ix["automobile"], ix["truck"]] == 2 and "motor vehicle" in lch[ix["automobile"]][ix["truck"]]
    # animals are closer to each other than to vehicles
    assert dist[ix["cat"], ix["deer"]] < dist[ix["cat"], ix["truck"]]
    assert wnids[ix["dog"]] == "n02084071"
    close, far = choose_pairs(dist)
    assert dist[close] == dist[dist > 0].min() and dist[far] == dist.max()
    with pytest.raises(ValueError, match="no synset"):
        wordnet_distances(wn, ("cat", "unicorn"))


def test_correlation_matrix_is_a_gaussian_kernel_of_wordnet_distance(shared_dir):
    wn = shared_dir / "data" / "wordnet"
    if not wn.is_dir():
        pytest.skip(f"needs {wn}")
    dist, _, _ = wordnet_distances(wn, CIFAR10)
    ix = {c: i for i, c in enumerate(CIFAR10)}
    corr = correlation_matrix(dist, sigma=1.0)
    assert corr[ix["automobile"], ix["truck"]] == pytest.approx(np.exp(-2.0)) == pytest.approx(0.135335, abs=1e-6)
    assert np.array_equal(np.diag(corr), np.ones(10)) and np.array_equal(corr, corr.T)
    assert corr[ix["cat"], ix["deer"]] > corr[ix["cat"], ix["truck"]]  # closer classes correlate more


def test_correlation_matrix_needs_a_positive_sigma():
    d = np.array([[0, 2], [2, 0]])
    np.testing.assert_allclose(correlation_matrix(d, 2.0), [[1, np.exp(-0.5)], [np.exp(-0.5), 1]])
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma must be a positive number"):
            correlation_matrix(d, sigma)


def test_choose_pairs_breaks_ties_by_class_index():
    d = np.array([[0, 3, 1, 5], [3, 0, 5, 1], [1, 5, 0, 2], [5, 1, 2, 0]])
    assert choose_pairs(d) == ((0, 2), (0, 3))


def test_derangement_has_no_fixed_points_and_follows_the_seed():
    for seed in range(20):
        p = derangement(10, seed)
        assert sorted(p) == list(range(10)) and np.all(p != np.arange(10))
    assert np.array_equal(derangement(10, 3), derangement(10, 3))
    assert any(not np.array_equal(derangement(10, 0), derangement(10, s)) for s in range(1, 5))
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_cache_written_by_other_arguments_is_refused(tmp_path):
    check_cache_config(tmp_path, Config().cache_key())
    check_cache_config(tmp_path, Config(runs=3).cache_key())  # runs only affect the (re-computed) detection
    with pytest.raises(ValueError, match="eps"):
        check_cache_config(tmp_path, Config(eps=0.02).cache_key())


def test_config_checks_sizes_against_the_pool():
    with pytest.raises(ValueError, match="exceeds the training pool"):
        Config(train_per_class=50, sizes=(10, 100))


def test_attack_correlations_keep_only_attacks_that_worked():
    spec = GateSpec(("a", "b"), (3, 4))
    rng = np.random.default_rng(0)
    n = 6
    orig = {"cdrp": rng.random((n, 7)), "label": np.array([0, 0, 1, 1, 2, 2]),
            "pred": np.array([0, 1, 1, 1, 2, 2]), "fell_back": np.array([0, 0, 0, 0, 0, 1], bool)}
    adv = {"cdrp": rng.random((n, 7)), "pred": np.array([1, 2, 0, 1, 0, 0]), "fell_back": np.zeros(n, bool)}
    paths = rng.random((3, 7))
    target = np.array([1, 2, 0, 0, 0, 0])
    res = attack_correlations(adv, orig, paths, spec, target)
    # 0: correct + reached target; 1: original misclassified; 2: ok; 3: missed the target;
    # 4: ok; 5: original fell back (all-ones gates are no routing path)
    assert (res["n"], res["n_worked"], res["n_total"]) == (3, 4, 6)
    assert res["corr"]["to_original"].shape == (3, 2)
    from jaxroute.analysis import rowwise_corr

    np.testing.assert_allclose(res["corr"]["to_reached_class"][:, 1],
                               rowwise_corr(adv["cdrp"][[0, 2, 4], 3:], paths[[1, 0, 0], 3:]))
    np.testing.assert_allclose(res["corr"]["to_source_class"][:, 0],
                               rowwise_corr(adv["cdrp"][[0, 2, 4], :3], paths[[0, 1, 2], :3]))
    untargeted = attack_correlations(adv, orig, paths, spec, None)
    assert untargeted["n"] == 3 and untargeted["n_worked"] == 4  # 0, 2, 4 (+5 fell back)


@pytest.mark.slow
def test_tiny_end_to_end_run_resumes_and_matches_jaxroute_detect(shared_dir, cifar_resnet_ckpt, tmp_path, capsys):
    """A handful of images, T=2: every output is written, a second run reuses the cache, and
    ``jaxroute detect`` on the cached shards reproduces the experiment's detection numbers."""
    from experiments.cdrp_analysis import run
    from jaxroute.cli.main import main

    cfg = Config(weights=str(cifar_resnet_ckpt("resnet20")), data=str(shared_dir / "data" / "cifar10-jpeg"),
                 wordnet=str(shared_dir / "data" / "wordnet"), test_per_class=3, train_per_class=4,
                 sizes=(2, 4), runs=2, attack_steps=2, dgr_steps=2, batch_size=8, clusters=2, per_cluster=4)
    out = tmp_path / "cdrp"
    res = run(cfg, out, log=lambda m: None)
    for f in ["cdrp.md", "cdrp.json", "detection.png", "divergence.png", "layer_scores.png", "layers_tsne.png"] + \
             [f"intra_{c}.png" for c in CIFAR10]:
        assert (out / f).stat().st_size > 0, f
    assert "NaN" not in (out / "cdrp.json").read_text()  # strict JSON
    saved = json.loads((out / "cdrp.json").read_text())
    assert saved["wordnet"]["close_pair"] == ["automobile", "truck"]
    assert saved["routing"]["test_real"]["n"] == 30 and saved["routing"]["train_perm"]["n"] == 40
    assert len(saved["layers"]["rows"]) == 19 and len(saved["intra_class"]) == 10
    rows = {(r["per_class"], r["classifier"]): r for r in res["detection"]["cdrp"]}
    assert set(rows) == {(s, c) for s in (2, 4) for c in cfg.classifiers}
    assert all(0.0 <= r["auc_mean"] <= 1.0 and len(r["aucs"]) == 2 for r in rows.values())
    md = (out / "cdrp.md").read_text()
    assert "| 4 | CDRP |" in md and "| 4 | penultimate activations |" in md
    assert saved["routing"]["test_officialcarried"]["n"] == 30 and saved["routing"]["train_official"]["n"] == 40
    assert saved["attacks"]["test_official"]["max_linf"] < saved["attacks"]["test_perm"]["max_linf"]
    assert res["detection_official"] and res["detection_official_carried"]
    assert "official release's attack scale" in md and "real twin's routing" in md

    shards = {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npz")}
    res2 = run(cfg, out, log=lambda m: None)
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").rglob("*.npz")} == shards
    assert res2["detection"] == res["detection"]

    with pytest.raises(ValueError, match="other arguments"):
        run(Config(**{**cfg.__dict__, "eps": 0.02}), out, log=lambda m: None)

    capsys.readouterr()
    r = out / "cache" / "route"
    assert main(["detect", "--train-real", str(r / "train_real"), "--train-adv", str(r / "train_perm"),
                 "--test-real", str(r / "test_real"), "--test-adv", str(r / "test_perm"), "--sizes", "2,4",
                 "--runs", "2", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for c in cfg.classifiers:
        assert cli[c]["auc_mean"] == pytest.approx(rows[(4, c)]["auc_mean"], abs=1e-12)
        assert cli[c]["auc_std"] == pytest.approx(rows[(4, c)]["auc_std"], abs=1e-12)
