"""The class-subnetwork Mahalanobis detector (Wang, Hu, Su, arXiv:1910.02673, §5.2, Eq. 4-5).

Against the plain Mahalanobis detector (all-ones subnetworks read the same
features) and a float64 numpy transcription of Eq. 4-5; a randomly
initialised digits CNN keeps the default tests fast.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.covariance import EmpiricalCovariance

from jaxroute.detection.features import class_gated_features, feature_fn, pooled_features
from jaxroute.detection.gaussian import fit_class_gaussians, mahalanobis, paired_mahalanobis
from jaxroute.detection.job import run_detection, subnet_gates
from jaxroute.detection.mahalanobis import (
    MahalanobisConfig, MahalanobisScorer, SubnetMahalanobisScorer, fit_layer_gaussians, subnet_layer_scores,
)
from jaxroute.models import GatedModel, create_model, default_meta, init_model
from jaxroute.routing.subnet import Subnets, class_gates

EPS = (0.0, 0.005, 0.01)


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised digits CNN, 400 digits training images and 40 test images with labels."""
    from jaxroute.data import load_dataset

    module = create_model("digits_cnn")
    model = GatedModel(module, init_model(module, jax.random.key(0), (8, 8, 1)), default_meta("digits_cnn"))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    return (model, np.asarray(train.images[:400], np.float32), np.asarray(train.labels[:400]),
            np.asarray(test.images[:40], np.float32))


def random_gates(model, seed: int = 1) -> np.ndarray:
    """Distinct gates per class: uniform in [0.5, 1.5], a fifth of them switched off."""
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.5, 1.5, (model.num_classes, model.spec.size)) * (rng.random((10, model.spec.size)) > 0.2)
    return g.astype(np.float32)


def save_subnets(path, gates: np.ndarray) -> None:
    k = len(gates)
    s = Subnets(gates=gates, sparsity=np.mean(gates > 0, 1), selected_epoch=np.ones(k, int),
                fallback=np.zeros(k, bool), classes=np.arange(k), snapshot_gates=gates[None],
                snapshot_loss=np.zeros((1, k)), snapshot_sparsity=np.mean(gates > 0, 1)[None],
                train_loss=np.zeros((1, k)))
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "subnets.npz", **s._asdict())


def train_features(model, pts, x, y, gates=None):
    if gates is None:
        out = feature_fn(model, pts)(x, None, None)
    else:
        out = feature_fn(model, pts, class_gates=gates, by_label=True)(x, jnp.asarray(y), None)
    return [np.asarray(out[f"pool_{p}"]) for p in pts]


def test_all_ones_subnetworks_equal_the_plain_detector(tiny):
    """Λ_c = 1 for every c: the same features, so the same Gaussians and layer scores (every ε)."""
    model, x, y, q = tiny
    pts = ("conv1", "conv3")
    ones = np.ones((10, model.spec.size), np.float32)
    cfg = MahalanobisConfig(epsilons=EPS, shrinkage="ledoit_wolf")
    plain = MahalanobisScorer(model, pts, cfg, batch_size=16).fit(train_features(model, pts, x, y), y)
    sub = SubnetMahalanobisScorer(model, pts, ones, cfg, batch_size=16).fit(
        train_features(model, pts, x, y, ones), y)
    for a, b in zip(plain.gaussians, sub.gaussians):
        np.testing.assert_allclose(a.means, b.means, rtol=1e-6)
    want, got = plain.score(q[:20]), sub.score(q[:20])
    assert got.shape == (20, 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float64_reference_of_eq_4_5(tiny):
    """Distinct gates per class; the class means, EmpiricalCovariance's precision and the score
    max_c −½ (f_c − μ̂_c)ᵀ Σ̂⁻¹ (f_c − μ̂_c) transcribed in float64 numpy, one image and one class at a time,
    with the pre-processing gradient of the closest class's distance through its own subnetwork."""
    model, x, y, q = tiny
    pts = ("conv1", "conv2")
    gates = random_gates(model).astype(np.float64)
    with jax.enable_x64():
        m = model.with_variables(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.variables))
        x64, q64 = np.asarray(x, np.float64), np.asarray(q[:3], np.float64)
        # f_c of a batch: the pooled features through Λ_c (one compiled shape per batch size)
        feats = jax.jit(lambda xb, g: pooled_features(m, xb, pts, g)[0])
        train = train_features(m, pts, x64, y, gates)
        gs, kept = fit_layer_gaussians(train, y, 10, shrinkage="none")
        assert all(len(k) == f.shape[1] for k, f in zip(kept, train))
        got = np.asarray(jax.jit(lambda gs, xb: subnet_layer_scores(m, gs, pts, xb, gates, EPS))(gs, q64))
        assert got.shape == (3, 2, 3)
        through = [[np.asarray(f) for f in feats(x64, gates[c])] for c in range(10)]   # every image through Λ_c
        for li, p in enumerate(pts):
            own = [through[c][li][y == c] for c in range(10)]              # class c's images through Λ_c
            mu = np.stack([f.mean(0) for f in own])
            for c in range(10):
                np.testing.assert_allclose(train[li][y == c], own[c], rtol=1e-10)
            prec = EmpiricalCovariance().fit(np.concatenate([f - mu[c] for c, f in enumerate(own)])).precision_

            def dist(xi, c, li=li, mu=mu, prec=prec):
                v = np.asarray(feats(xi[None], gates[c])[li][0]) - mu[c]
                return float(v @ prec @ v)

            half = jax.jit(jax.grad(lambda xi, g, mu_c, li=li, prec=jnp.asarray(prec):      # ½ d_c of one image
                                    0.5 * (lambda v: v @ prec @ v)(feats(xi[None], g)[li][0] - mu_c)))
            for i in range(3):
                c_hat = int(np.argmin([dist(q64[i], c) for c in range(10)]))
                step = np.where(np.asarray(half(q64[i], gates[c_hat], mu[c_hat])) >= 0, 1.0, -1.0)
                for ei, e in enumerate(EPS):
                    ref = max(-0.5 * dist(q64[i] - e * step, c) for c in range(10))
                    assert got[i, li, ei] == pytest.approx(ref, rel=1e-6)


def test_one_image_alone_equals_inside_a_batch(tiny):
    model, x, y, q = tiny
    pts = ("conv2", "conv3")
    gates = random_gates(model, seed=2)
    scorer = SubnetMahalanobisScorer(model, pts, gates, MahalanobisConfig(epsilons=EPS, shrinkage="ledoit_wolf"),
                                     batch_size=16).fit(train_features(model, pts, x, y, gates), y)
    batch = scorer.score(q[:20])                                       # 16 + a padded batch of 4
    for i in (0, 17):
        np.testing.assert_allclose(scorer.score(q[i:i + 1])[0], batch[i], rtol=1e-5, atol=1e-5)


def test_paired_distances_and_own_label_features(tiny):
    model, x, y, _ = tiny
    rng = np.random.default_rng(0)
    f, labels = rng.normal(size=(200, 4)), rng.integers(0, 3, 200)
    q = rng.normal(size=(5, 3, 4))
    for cov in ("tied", "per_class"):
        g = fit_class_gaussians(f, labels, 3, covariance=cov, shrinkage="none")
        full = np.stack([np.asarray(mahalanobis(g, q[:, c]))[:, c] for c in range(3)], 1)
        np.testing.assert_allclose(np.asarray(paired_mahalanobis(g, q)), full, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 3, 4\)"):
        paired_mahalanobis(g, q[:, :2])
    gates = random_gates(model)
    own = feature_fn(model, ("conv3",), class_gates=gates, by_label=True)(x[:12], jnp.asarray(y[:12]), None)
    per = class_gated_features(model, jnp.asarray(x[:12]), ("conv3",), jnp.asarray(gates))[0]
    np.testing.assert_allclose(own["pool_conv3"], np.asarray(per)[np.arange(12), y[:12]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="by_label"):
        feature_fn(model, ("conv3",), by_label=True)


def test_subnetworks_of_another_model_or_absent_are_refused(tiny, tmp_path):
    model, x, y, q = tiny
    gates = random_gates(model)
    save_subnets(tmp_path / "ok", gates)
    np.testing.assert_array_equal(subnet_gates(tmp_path / "ok", model), gates)
    np.testing.assert_array_equal(subnet_gates(gates, model), gates)
    s = Subnets(**dict(np.load(tmp_path / "ok" / "subnets.npz")))
    np.testing.assert_array_equal(class_gates(s, model), gates)
    save_subnets(tmp_path / "other", np.ones((10, model.spec.size + 3), np.float32))
    with pytest.raises(ValueError, match="gates per subnetwork"):
        subnet_gates(tmp_path / "other", model)
    with pytest.raises(FileNotFoundError, match="no subnets.npz"):
        subnet_gates(tmp_path / "empty", model)
    with pytest.raises(ValueError, match="one subnetwork per class"):
        subnet_gates(gates[:3], model)
    from jaxroute.data import Dataset

    data = Dataset(q, np.zeros(len(q), np.int32), tuple(map(str, range(10))), "digits")
    with pytest.raises(ValueError, match="--subnets"):
        run_detection(model, data, data, out=tmp_path / "o", detectors=("subnet",))
    assert not (tmp_path / "o").exists()


def test_adv_detect_cli_subnet_errors(tmp_path, capsys):
    """Another model's subnetworks, or a folder without subnets.npz: one line, exit 2, before any data."""
    from jaxroute.cli.main import main

    save_subnets(tmp_path / "resnet20", np.ones((10, 7), np.float32))
    (tmp_path / "none").mkdir()
    argv = ["adv-detect", "--model", "digits_cnn", "--data", "digits", "--detectors", "mahalanobis,subnet",
            "--out", str(tmp_path / "o")]
    for sub, msg in ((tmp_path / "resnet20", "gates per subnetwork"), (tmp_path / "none", "no subnets.npz")):
        assert main(argv + ["--subnets", str(sub)]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
        assert len(err) == 1 and err[0].startswith("jaxroute adv-detect: error:") and msg in err[0], err


@pytest.mark.slow
def test_adv_detect_cli_subnet_end_to_end(digits_ckpt, tmp_path, capsys):
    """The whole protocol on the trained digits CNN (DeepFool: nearly every image is selected): all-ones
    subnetworks give the plain detector's AUROC and ε choice; distinct subnetworks score in range; other
    subnetworks in the same folder are refused."""
    import json

    from jaxroute.cli.main import main

    from jaxroute.weights import load_model

    model = load_model(None, digits_ckpt)
    save_subnets(tmp_path / "ones", np.ones((10, model.spec.size), np.float32))
    save_subnets(tmp_path / "random", random_gates(model))
    out = tmp_path / "det"
    argv = ["adv-detect", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits",
            "--limit", "150", "--train-limit", "500", "--attacks", "deepfool", "--eps", "0,0.005",
            "--detectors", "mahalanobis,subnet", "--json"]
    assert main(argv + ["--subnets", str(tmp_path / "ones"), "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["subnet"] == pytest.approx(res["mahalanobis"], abs=1e-6)
    assert res["chosen"]["subnet"] == res["chosen"]["mahalanobis"] == res["chosen_eps"]
    for f in ("scores/subnet-clean.npz", "scores/subnet-deepfool.npz", "features/train-subnet/manifest.json"):
        assert (out / f).exists(), f
    assert main(argv + ["--subnets", str(tmp_path / "random"), "--out", str(out)]) == 2
    assert "jaxroute adv-detect: error:" in capsys.readouterr().err
    assert main(argv + ["--subnets", str(tmp_path / "random"), "--out", str(tmp_path / "det2")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= res["subnet"]["deepfool"] <= 1.0 and res["chosen"]["subnet"]["deepfool"][0] in ("eps=0", "eps=0.005")
