"""Feature-space detectors (Mahalanobis, LID, KD+PU) and their protocol, against direct references.

A randomly initialised digits CNN on scikit-learn's digits keeps every test fast.
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KernelDensity as SkKernelDensity

from jaxroute.detection.density import KDPUConfig, KernelDensity, mc_probabilities, predictive_uncertainty, random_gate_fn
from jaxroute.detection.features import (
    class_gated_features, feature_fn, last_stage_points, pooled_features, stage_points,
)
from jaxroute.detection.gaussian import mahalanobis
from jaxroute.detection.lid import LIDConfig, lid_features
from jaxroute.detection.mahalanobis import MahalanobisConfig, MahalanobisScorer, fit_layer_gaussians, layer_scores
from jaxroute.detection.protocol import (
    LogisticDetector, block_split, fit_choose, noise_sigma, noisy_twins, run_protocol, select, tnr_at_tpr95,
)
from jaxroute.models import GatedModel, create_model, default_meta, gate_spec, init_model


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised digits CNN and the 360 digits test images with labels."""
    from jaxroute.data import load_dataset

    module = create_model("digits_cnn")
    model = GatedModel(module, init_model(module, jax.random.key(0), (8, 8, 1)), default_meta("digits_cnn"))
    ds = load_dataset("digits", "test")
    return model, np.asarray(ds.images, np.float32), np.asarray(ds.labels)


def float64_model(model):
    return model.with_variables(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.variables))


def test_stage_points():
    resnet = SimpleNamespace(spec=gate_spec(create_model("resnet20"), (32, 32, 3)))
    assert stage_points(resnet) == ("conv1", "layer1.2", "layer2.2", "layer3.2")
    assert last_stage_points(resnet) == ("layer3.0.conv1", "layer3.0", "layer3.1.conv1", "layer3.1",
                                         "layer3.2.conv1", "layer3.2")
    digits = SimpleNamespace(spec=gate_spec(create_model("digits_cnn"), (8, 8, 1)))
    assert stage_points(digits) == ("conv1", "conv2", "conv3")
    assert last_stage_points(digits) == ("conv3",)


def test_features_plain_and_class_gated(tiny):
    model, x, _ = tiny
    pts = ("conv1", "conv3")
    out = feature_fn(model, pts)(x[:6], None, None)
    cap = model.capture(x[:6])
    # two compiled float32 programs: XLA may order the reductions differently
    np.testing.assert_allclose(out["pool_conv1"], cap.acts["conv1"].mean((1, 2)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["penultimate"], cap.features, rtol=1e-5, atol=1e-7)
    gates = jax.random.uniform(jax.random.key(1), (10, model.spec.size))     # one flat gate vector per class
    per = jax.jit(lambda x, g: class_gated_features(model, x, pts, g))(x[:6], gates)
    assert per[1].shape == (6, 10, 128)
    for c in (0, 7):
        ref, _ = jax.jit(lambda x, g: pooled_features(model, x, pts, g))(x[:6], gates[c])
        np.testing.assert_allclose(per[1][:, c], ref[1], rtol=1e-5, atol=1e-6)
    # the same gates as a function (c, point, activation) -> gate
    tree = model.spec.split(gates)
    fn = jax.jit(lambda x: class_gated_features(model, x, pts, lambda c, name, a: tree[name][c], num_classes=10))(x[:6])
    np.testing.assert_allclose(fn[1], per[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown gate point"):
        feature_fn(model, ("layer9",))


def test_mahalanobis_matches_per_sample_reference(tiny):
    """Batched scores with pre-processing = a per-sample, per-layer, per-ε loop with the explicit
    precision matrix (the reference code's formulation), in float64."""
    model, x, y = tiny
    pts = ("conv1", "conv3")
    eps = (0.0, 0.01, 0.002)
    with jax.enable_x64():
        m = float64_model(model)
        x64 = np.asarray(x, np.float64)
        train, _ = pooled_features(m, x64, pts)
        gs, kept = fit_layer_gaussians([np.asarray(f) for f in train], y, 10, shrinkage="ledoit_wolf")
        assert kept[0] == tuple(range(32))
        got = np.asarray(jax.jit(lambda gs, xb: layer_scores(m, gs, pts, xb, eps))(gs, x64[:3]))
        assert got.shape == (3, 2, 3)
        for li, (g, p) in enumerate(zip(gs, pts)):
            prec, mu = jnp.asarray(g.precisions[0]), jnp.asarray(g.means)

            @jax.jit
            def dist(xi, p=p, prec=prec, mu=mu):
                f = m.capture(xi[None]).acts[p].mean((1, 2))[0] - mu            # (K, C)
                return jnp.einsum("kc,cd,kd->k", f, prec, f)

            half = jax.jit(jax.grad(lambda xi, c, dist=dist: 0.5 * dist(xi)[c]))
            for i in range(3):
                c = int(jnp.argmin(dist(x64[i])))
                step = np.where(np.asarray(half(x64[i], c)) >= 0, 1.0, -1.0)
                for ei, e in enumerate(eps):
                    ref = float(jnp.max(-0.5 * dist(x64[i] - e * step)))
                    assert got[i, li, ei] == pytest.approx(ref, rel=1e-6)


def test_mahalanobis_scorer(tiny):
    model, x, y = tiny
    pts = stage_points(model)
    feats = feature_fn(model, pts)(x, None, None)
    scorer = MahalanobisScorer(model, pts, MahalanobisConfig(epsilons=(0.0, 0.005), shrinkage="ledoit_wolf"),
                               batch_size=32)
    scorer.fit([np.asarray(feats[f"pool_{p}"]) for p in pts], y)
    s = scorer.score(x[:40])                                                   # 32 + a padded batch of 8
    assert s.shape == (40, 3, 2) and np.isfinite(s).all()
    g = scorer.gaussians[0]
    ref = np.max(-0.5 * np.asarray(jax.jit(mahalanobis)(g, feats["pool_conv1"][:40])), axis=1)
    np.testing.assert_allclose(s[:, 0, 0], ref, rtol=1e-4, atol=1e-4)        # ε = 0: no pre-processing
    # a dead channel (constant over the training images) is left out: the reference's pseudo-inverse
    dead = [np.asarray(feats[f"pool_{p}"]).copy() for p in pts]
    dead[0][:, 3] = 0.0
    gs, kept = fit_layer_gaussians(dead, y, 10)
    assert 3 not in kept[0] and len(kept[0]) == 31 and kept[1] == tuple(range(64))
    from sklearn.covariance import EmpiricalCovariance
    means = np.stack([dead[0][y == c].mean(0) for c in range(10)])
    prec = EmpiricalCovariance().fit(dead[0] - means[y]).precision_        # pinvh of the singular covariance
    q = dead[0][:5] + 0.01
    ref = np.einsum("nkd,de,nke->nk", q[:, None] - means[None], prec, q[:, None] - means[None])
    np.testing.assert_allclose(np.asarray(mahalanobis(gs[0], q[:, kept[0]].astype(np.float32))), ref, rtol=1e-3)
    with pytest.raises(ValueError, match="another model"):
        MahalanobisScorer(model, pts).fit([np.zeros((20, 5))] * 3, y[:20])
    with pytest.raises(ValueError, match="epsilons"):
        MahalanobisConfig(epsilons=(-0.1,))


def _reference_mle_batch(data, batch, k, drop_first=True):
    """Lee et al.'s ``mle_batch`` (scipy cdist), with the first neighbour dropped or kept."""
    data, batch = np.asarray(data, np.float32), np.asarray(batch, np.float32)
    k = min(k, len(data) - 1)
    a = np.sort(cdist(batch, data), axis=1)
    a = a[:, 1:k + 1] if drop_first else a[:, :k]
    return np.array([-k / np.sum(np.log(v / v[-1])) for v in a])


@pytest.mark.parametrize("rule", ["self", "all"])
def test_lid_matches_cdist_loop(rule):
    rng = np.random.default_rng(0)
    clean = [rng.normal(size=(70, 16)), rng.normal(size=(70, 4, 2))]           # second layer: flattened
    adv = [c + rng.normal(size=c.shape) * 0.5 for c in clean]
    cfg = LIDConfig(ks=(5, 20), batch_size=30, drop_first=rule)                # last batch: 10 images, k -> 9
    got_clean, got_adv = lid_features(clean, [adv], cfg)
    assert got_clean.shape == (70, 2, 2)
    for lo in range(0, 70, 30):
        for li in range(2):
            ref = clean[li][lo:lo + 30].reshape(len(clean[li][lo:lo + 30]), -1)
            q = adv[li][lo:lo + 30].reshape(len(ref), -1)
            for ki, k in enumerate(cfg.ks):
                np.testing.assert_allclose(got_clean[lo:lo + 30, li, ki], _reference_mle_batch(ref, ref, k),
                                           rtol=1e-5)
                np.testing.assert_allclose(got_adv[lo:lo + 30, li, ki],
                                           _reference_mle_batch(ref, q, k, drop_first=(rule == "all")), rtol=1e-5)
    with pytest.raises(ValueError, match="drop_first"):
        LIDConfig(drop_first="none")
    # 61 images in batches of 30: the single last image joins the second batch (31 images)
    c61, a61 = lid_features([clean[0][:61]], [[adv[0][:61]]], cfg)
    np.testing.assert_allclose(c61[30:, 0, 1], _reference_mle_batch(clean[0][30:61], clean[0][30:61], 20), rtol=1e-5)
    # 62 images: a last batch of two (k would be 1: one distance over itself, no estimate) joins as well
    c62, a62 = lid_features([clean[0][:62]], [[adv[0][:62]]], cfg)
    assert np.isfinite(c62).all() and np.isfinite(a62).all()
    np.testing.assert_allclose(c62[30:, 0, 1], _reference_mle_batch(clean[0][30:62], clean[0][30:62], 20), rtol=1e-5)
    with pytest.raises(ValueError, match="at least 3 images"):
        lid_features([clean[0][:2]], [], cfg)


def test_kernel_density_matches_sklearn():
    rng = np.random.default_rng(1)
    train, labels = rng.normal(size=(300, 8)), rng.integers(0, 3, 300)
    q, pred = rng.normal(size=(50, 8)) * 0.5, rng.integers(0, 3, 50)
    kd = KernelDensity(0.26, chunk=16).fit(train, labels)
    got = kd.score(q, pred)
    for c in range(3):
        ref = SkKernelDensity(kernel="gaussian", bandwidth=0.26).fit(train[labels == c]).score_samples(q[pred == c])
        np.testing.assert_allclose(got[pred == c], ref, rtol=1e-5)
    with pytest.raises(ValueError, match="no training samples of class"):
        kd.score(q[:2], np.array([0, 5]))


def test_predictive_uncertainty_random_gates(tiny):
    model, x, _ = tiny
    gates = random_gate_fn(model, jax.random.key(3), 0.5, ("conv3",))
    a = jnp.ones((4, 2, 2, 128))
    g3 = np.asarray(gates("conv3", a))
    assert g3.shape == (4, 128) and set(np.unique(g3)) <= {0.0, 2.0} and 0.3 < g3.mean() / 2 < 0.7
    assert np.all(np.asarray(gates("conv1", jnp.ones((4, 8, 8, 32)))) == 1)
    probs = jax.jit(lambda x, k: mc_probabilities(model, x, k, passes=5))(x[:6], jax.random.key(0))
    assert probs.shape == (5, 6, 10)
    np.testing.assert_allclose(predictive_uncertainty(probs), np.var(np.asarray(probs), 0).mean(1), rtol=1e-5)
    assert float(predictive_uncertainty(probs).max()) > 0
    still = jax.jit(lambda x, k: mc_probabilities(model, x, k, passes=3, keep=1.0))(x[:6], jax.random.key(0))
    assert float(predictive_uncertainty(still).max()) < 1e-10
    with pytest.raises(ValueError, match="keep"):
        KDPUConfig(keep=0.0)


def _reference_split(X, Y):
    """``block_split_adv`` and the ``pivot`` slicing of Lee et al.'s ``ADV_Regression.py``, transcribed."""
    partition = int(X.shape[0] / 3)
    X_adv, Y_adv = X[:partition], Y[:partition]
    X_norm, Y_norm = X[partition:2 * partition], Y[partition:2 * partition]
    X_noisy, Y_noisy = X[2 * partition:], Y[2 * partition:]
    num_train = int(partition * 0.1)
    X_val = np.concatenate((X_norm[:num_train], X_noisy[:num_train], X_adv[:num_train]))
    Y_val = np.concatenate((Y_norm[:num_train], Y_noisy[:num_train], Y_adv[:num_train]))
    X_test = np.concatenate((X_norm[num_train:], X_noisy[num_train:], X_adv[num_train:]))
    Y_test = np.concatenate((Y_norm[num_train:], Y_noisy[num_train:], Y_adv[num_train:]))
    pivot = int(X_val.shape[0] / 6)
    X_train = np.concatenate((X_val[:pivot], X_val[2 * pivot:3 * pivot], X_val[4 * pivot:5 * pivot]))
    Y_train = np.concatenate((Y_val[:pivot], Y_val[2 * pivot:3 * pivot], Y_val[4 * pivot:5 * pivot]))
    X_vt = np.concatenate((X_val[pivot:2 * pivot], X_val[3 * pivot:4 * pivot], X_val[5 * pivot:]))
    Y_vt = np.concatenate((Y_val[pivot:2 * pivot], Y_val[3 * pivot:4 * pivot], Y_val[5 * pivot:]))
    return X_train, Y_train, X_vt, Y_vt, X_test, Y_test


@pytest.mark.parametrize("n", [47, 55, 200])
def test_block_split_equals_reference(n):
    rng = np.random.default_rng(n)
    adv, clean, noisy = (rng.normal(size=(n, 3)) for _ in range(3))
    perm = np.random.default_rng([0, 0]).permutation(n)
    X = np.concatenate([adv[perm], clean[perm], noisy[perm]])
    Y = np.r_[np.ones(n), np.zeros(2 * n)]
    fit, val, test = block_split(n)
    for got, ref in zip((X[fit], Y[fit], X[val], Y[val], X[test], Y[test]), _reference_split(X, Y)):
        np.testing.assert_array_equal(got, ref)


def test_protocol_selection_choice_and_unknown():
    rng = np.random.default_rng(0)
    n = 300

    def blocks(shift):
        clean, noisy = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
        adv = rng.normal(size=(n, 2)) + np.array([shift, 0.0])
        useless = [rng.normal(size=(n, 2)) for _ in range(3)]
        return {"informative": (adv, clean, noisy), "useless": tuple(useless)}

    chars = {"fgsm": blocks(3.0), "bim": blocks(2.0)}
    fast = lambda seed: LogisticDetector(seed, solver="liblinear")      # noqa: E731
    res = run_protocol(chars, runs=2, seed=0, detector=fast)
    assert res["known"]["fgsm"]["chosen"] == ["informative", "informative"]
    assert res["known"]["fgsm"]["mean"] > 0.95 and len(res["known"]["fgsm"]["aurocs"]) == 2
    assert set(res["unknown"]) == {"bim"} and res["unknown"]["bim"]["mean"] > 0.85
    one = fit_choose(chars["fgsm"], np.arange(n), detector=fast)
    assert one["chosen"] == "informative" and set(one["val_tnr"]) == {"informative", "useless"}
    with pytest.raises(ValueError, match="selected images"):
        fit_choose({"a": tuple(np.zeros((39, 2)) for _ in range(3))}, np.arange(39))
    with pytest.raises(ValueError, match="runs"):
        run_protocol(chars, runs=0)

    y = np.array([1, 2, 3, 4])
    np.testing.assert_array_equal(select(y, [1, 2, 3, 0], [1, 0, 3, 4], [0, 0, 3, 1]), [True, False, False, False])
    assert noise_sigma([2.0, 4.0], (8, 8, 1)) == pytest.approx(3.0 / 8)
    z = noisy_twins(jnp.full((2000, 8, 8, 1), 0.5), 0.05, jax.random.key(0))
    assert float(z.min()) >= 0 and abs(float(jnp.linalg.norm((z - 0.5).reshape(2000, -1), axis=1).mean()) - 0.4) < 0.02
    assert tnr_at_tpr95([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_logistic_detector_names_too_few_training_rows():
    """Fewer than 5 rows of every label (a small selection split by the reference's block split):
    one clear error instead of scikit-learn's stratified-fold message."""
    x = np.arange(6.0)[:, None]
    with pytest.raises(ValueError, match=r"\{0: 4, 1: 2\} images per label; its 5-fold validation"):
        LogisticDetector().fit(x, np.array([0, 0, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="both real"):
        LogisticDetector().fit(x, np.zeros(6, int))


def test_logistic_detector_fits_without_deprecation_warnings():
    """The reference's LogisticRegressionCV defaults are spelled out: scikit-learn 1.9 would otherwise warn
    (FutureWarning) on every fit, thousands of times in one detection run; the fit is still accuracy-picked L2."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        det = LogisticDetector().fit(x, y)
    assert det.model.penalty in ("l2", "deprecated") and roc_auc_score(y, det.score(x)) > 0.85



def _fake_attack(out, name, images, labels, rng):
    """An attack cache file (``attacks/<name>.npz`` of :func:`~jaxroute.detection.job.attack_twins`):
    perturbed twins that count as misclassified, noisy twins that count as correct, so every image is
    selected without running an attack (the attacks are tested on their own)."""
    from jaxroute.utils.io import atomic_save_npz

    adv = np.clip(images + rng.normal(0, 0.1, images.shape), 0, 1).astype(np.float32)
    noisy = np.clip(images + rng.normal(0, 0.03, images.shape), 0, 1).astype(np.float32)
    atomic_save_npz(out / "attacks" / f"{name}.npz", adv=adv, adv_pred=(labels + 1) % 10, labels=labels,
                    l2=np.linalg.norm((adv - images).reshape(len(images), -1), axis=1), clean_pred=labels,
                    noisy=noisy, noisy_pred=labels, sigma=np.float64(0.03))


def test_cdrp_detector_row(tiny, tmp_path):
    """The cdrp detector: its characteristics are dgr_route's flattened gates of the same images (the
    clean images' computed once, each attack taking its selected rows), in fixed-size padded batches; its
    row is in the result (known and unknown attack) and in the table; a cdrp-only run extracts no
    features; another classifier reuses the cache, another DGR config is refused; unknown detector or
    classifier names end before any work.  The attacks' cache is written here (a random digits CNN, DGR
    with 4 steps) to keep the test fast."""
    from jaxroute.data import Dataset
    from jaxroute.detection.detector import CLASSIFIERS
    from jaxroute.detection.job import CDRP_CLASSIFIERS, cdrp_characteristics, format_table, run_detection
    from jaxroute.routing.dgr import DGRConfig, dgr_route

    model, images, labels = tiny
    n = 100
    x, y = images[:n], labels[:n]
    test = Dataset(x, y, tuple(map(str, range(10))), "digits")
    out = tmp_path / "det"
    rng = np.random.default_rng(0)
    for a in ("fgsm", "bim"):
        _fake_attack(out, a, x, y, rng)
    cfg = DGRConfig(steps=4)
    run = lambda **kw: run_detection(model, test, test, out=out, attacks=("fgsm", "bim"),   # noqa: E731
                                     detectors=("cdrp",), batch_size=48, log=lambda m: None, **{"dgr": cfg, **kw})
    res = run()
    for a in ("fgsm", "bim"):
        assert 0.0 <= res["cdrp"][a] <= 1.0 and res["chosen"]["cdrp"][a] == ["-"] and res["n_selected"][a] == n
    assert 0.0 <= res["unknown"]["cdrp"]["bim"] <= 1.0 and set(res["unknown"]["cdrp"]) == {"bim"}
    assert res["cdrp_classifier"] == "logistic" and res["dgr"]["steps"] == 4
    table = format_table(res, ("fgsm", "bim"), ("cdrp",)).splitlines()
    assert table[2].startswith("cdrp ") and table[3].startswith("  from fgsm")
    assert not (out / "features").exists()
    route = jax.jit(lambda x: dgr_route(model, x, config=cfg).cdrp)
    with np.load(out / "scores" / "cdrp-clean.npz") as z:
        clean = z["clean"]
    assert clean.shape == (n, model.spec.size)
    np.testing.assert_allclose(clean, route(x), atol=1e-6)
    for a in ("fgsm", "bim"):
        with np.load(out / "scores" / f"cdrp-{a}.npz") as z, np.load(out / "attacks" / f"{a}.npz") as t:
            np.testing.assert_array_equal(z["clean"], clean)
            np.testing.assert_allclose(z["adv"], route(t["adv"]), atol=1e-6)
            np.testing.assert_allclose(z["noisy"], route(t["noisy"]), atol=1e-6)
    np.testing.assert_allclose(cdrp_characteristics(model, x[:5], cfg, batch_size=3), clean[:5], atol=1e-6)
    # the same cached characteristics through one of the DGR paper's classifiers
    gb = run(cdrp_classifier="gradient_boosting")
    assert gb["cdrp_classifier"] == "gradient_boosting" and 0.0 <= gb["cdrp"]["fgsm"] <= 1.0
    assert set(CDRP_CLASSIFIERS) == {"logistic", *CLASSIFIERS}
    with pytest.raises(ValueError, match="other settings"):
        run(dgr=DGRConfig(steps=5))
    for kw, msg in (({"detectors": ("cdrp", "nope")}, r"unknown detector\(s\) \['nope'\]"),
                    ({"detectors": ("cdrp",), "cdrp_classifier": "svm"}, "unknown cdrp classifier"),
                    ({"detectors": ("cdrp",), "dgr": {"steps": 4}}, "DGRConfig")):
        with pytest.raises((ValueError, TypeError), match=msg):
            run_detection(model, test, test, out=tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()
