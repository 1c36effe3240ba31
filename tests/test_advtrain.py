"""Adversarial training with Xie et al.'s objective (FGSM on predictions, Eq. 7, CORAL, MMD, adaptation
layer) in the one adversarial-training step: each term against float64 references, the identity adaptation
layer and its fold into the classifier, 2 devices = 1, kill/resume, the CLI."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_devices import run_with_cpu_devices

from jaxroute.cli.main import main
from jaxroute.training.adversarial import (
    ADAPTATION, AdvTrainConfig, adversarial_batch, adversarial_fit, create_adv_train_state, export_params,
    head_name, train_step,
)

N_TRAIN, BATCH = 64, 16


@functools.lru_cache(maxsize=None)
def random_digits_model(ckpt: str | None = None):
    """A randomly initialised digits CNN, drawn in numpy on the abstract variables (jitting the module's
    init costs seconds of CPU), or loaded from its saved checkpoint."""
    from jaxroute.models.gated import GatedModel
    from jaxroute.models.meta import default_meta
    from jaxroute.models.registry import create_model
    from jaxroute.weights import load_model
    from jaxroute.weights.loader import abstract_variables

    if ckpt:
        return load_model(None, ckpt)
    meta = default_meta("digits_cnn", source="random-init")
    module = create_model("digits_cnn", **meta.module_overrides())
    rng = np.random.default_rng(0)

    def draw(path, a):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:  # He-normal over the fan-in
            return (rng.normal(size=a.shape) * np.sqrt(2 / np.prod(a.shape[:-1]))).astype(a.dtype)
        return (np.ones if ("var" in name or "scale" in name) else np.zeros)(a.shape, a.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(module, meta.input_shape))
    return GatedModel(module, variables, meta)


@functools.lru_cache(maxsize=None)
def digits_train():
    from jaxroute.data import Dataset, load_dataset

    full = load_dataset("digits", "train")
    return Dataset(full.images[:N_TRAIN], full.labels[:N_TRAIN], full.class_names, f"digits:train[:{N_TRAIN}]")


FIT_CONFIG = AdvTrainConfig(objective="xie", epochs=2, batch_size=BATCH, lr=0.05)


def fit(out, model):
    """A small Xie run (the subprocess of the device test runs this too)."""
    return adversarial_fit(model, digits_train(), FIT_CONFIG, out)


def save_fit(out, ckpt):
    res = fit(out, random_digits_model(ckpt))
    leaves = jax.tree_util.tree_leaves((res["variables"], res["adaptation"]))
    np.savez(Path(out) / "result.npz", *[np.asarray(a) for a in leaves])


@pytest.fixture(scope="module")
def model():
    return random_digits_model()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    from jaxroute.weights import save_model

    path = tmp_path_factory.mktemp("ckpt") / "digits_cnn"
    save_model(path, model.variables, model.meta)
    return path


@pytest.fixture(scope="module")
def run_a(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("advtrain") / "a"
    return out, fit(out, model)


def leaves_of(res):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves((res["variables"], res["adaptation"]))]


# --------------------------------------------------------------------------- float64 references
def f64_ce(logits, y):
    z = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def f64_cov(x):
    xc = x - x.mean(0)
    return xc.T @ xc / (len(x) - 1)


def f64_coral(a, b, norm):
    k = a.shape[1]
    d = f64_cov(a) - f64_cov(b)
    return np.abs(d).sum() / k ** 2 if norm == "l1" else np.square(d).sum() / (4 * k ** 2)


def f64_gaussian_mmd2(a, b, factors=(0.25, 0.5, 1.0, 2.0, 4.0)):
    z = np.concatenate([a, b])
    n = len(z)
    dist = np.sqrt([[np.sum((z[i] - z[j]) ** 2) for j in range(n)] for i in range(n)])
    med = np.median(dist[np.triu_indices(n, 1)])

    def k(i, j):
        return sum(np.exp(-dist[i, j] ** 2 / (2 * (med * f) ** 2)) for f in factors)

    m = len(a)
    kxx = sum(k(i, j) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(m + i, m + j) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(i, m + j) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def f64_terms(fx, fa, lx, la, y, coral_norm, mmd) -> dict:
    k = fx.shape[1]
    return {"ce_clean": f64_ce(lx, y), "ce_adv": f64_ce(la, y),
            "consistency": float(np.mean(np.sum((fx - fa) ** 2, 1))),
            "coral": f64_coral(fx, fa, coral_norm),
            "mmd": np.abs(fx.mean(0) - fa.mean(0)).sum() / k if mmd == "linear" else f64_gaussian_mmd2(fx, fa)}


def test_each_term_enters_the_loss_exactly(model):
    """The step's loss is CE + CE_adv + λ_con·Eq. 7 + λ_coral·CORAL + λ_mmd·MMD on the adapted features,
    each term equal to a float64 computation from the same forward pass."""
    # a large ε keeps every term well above float32 rounding
    cfg = AdvTrainConfig(objective="xie", eps=0.1, beta=0.3, lambda_coral=0.7, lambda_mmd=1.9, batch_size=8)
    ds = digits_train()
    x, y = jnp.asarray(ds.images[:8]), jnp.asarray(ds.labels[:8])
    state = create_adv_train_state(model.module, model.variables, cfg, 1)
    rng = np.random.default_rng(0)
    k = state.params[ADAPTATION]["kernel"].shape[0]
    adapt = {"kernel": jnp.asarray(np.eye(k) + 0.2 * rng.normal(size=(k, k)), jnp.float32),
             "bias": jnp.asarray(0.1 * rng.normal(size=k), jnp.float32)}  # a non-identity layer: its path counts
    state = state.replace(params={**state.params, ADAPTATION: adapt})
    key = jax.random.key(1)

    @jax.jit  # one program: the step, and its adversarial batch and features for the references
    def step_and_inputs(state, x, y, key):
        _, m = train_step(state, {"image": x, "label": y}, key, cfg)
        adv, targets = adversarial_batch(state, x, y, key, cfg)
        return m, adv, targets, model.capture(x).features, model.capture(adv).features

    m, adv, targets, phi_x, phi_a = step_and_inputs(state, x, y, key)
    assert targets is None and float(jnp.max(jnp.abs(adv - x))) <= cfg.eps + 1e-6
    head = model.variables["params"][head_name(model.variables["params"], 10)]
    f64 = {}
    for tag, phi in (("x", phi_x), ("a", phi_a)):
        phi = np.asarray(phi, np.float64)
        f64[tag] = phi @ np.asarray(adapt["kernel"], np.float64) + np.asarray(adapt["bias"], np.float64)
        f64[tag + "_logits"] = f64[tag] @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    yy = np.asarray(y)
    ref = f64_terms(f64["x"], f64["a"], f64["x_logits"], f64["a_logits"], yy, "l1", "linear")
    for name, v in ref.items():
        assert float(m[name]) == pytest.approx(v, rel=2e-4, abs=1e-6), name
    # the FGSM batch (on the model's predictions) really attacks
    pred = f64["x_logits"].argmax(1)
    assert f64_ce(f64["a_logits"], pred) > f64_ce(f64["x_logits"], pred)
    want = ref["ce_clean"] + ref["ce_adv"] + 0.3 * ref["consistency"] + 0.7 * ref["coral"] + 1.9 * ref["mmd"]
    assert float(m["loss"]) == pytest.approx(want, rel=2e-4)
    # and exactly that combination of the step's own terms
    own = m["ce_clean"] + m["ce_adv"] + 0.3 * m["consistency"] + 0.7 * m["coral"] + 1.9 * m["mmd"]
    assert float(m["loss"]) == pytest.approx(float(own), rel=1e-6)

    # the other options, term by term on the same features: Deep CORAL and the Gaussian MMD², Dong's weights
    from jaxroute.training.adversarial import loss_terms, total_loss

    args = [jnp.asarray(f64[t], jnp.float32) for t in ("x_logits", "a_logits", "x", "a")]
    for cfg2, w_clean, w_adv in ((AdvTrainConfig(objective="xie", coral_norm="fro2", mmd="gaussian", lambda_coral=0.7,
                                                 lambda_mmd=1.9, beta=0.3), 1.0, 1.0),
                                 (AdvTrainConfig(alpha=0.25, beta=0.3, lambda_coral=0.7, lambda_mmd=1.9,
                                                 coral_norm="fro2", mmd="gaussian"), 0.25, 0.75)):
        got = loss_terms(*args, y, cfg2)
        ref = f64_terms(f64["x"], f64["a"], f64["x_logits"], f64["a_logits"], yy, "fro2", "gaussian")
        for name, v in ref.items():
            assert float(got[name]) == pytest.approx(v, rel=2e-4, abs=1e-6), name
        want = (w_clean * ref["ce_clean"] + w_adv * ref["ce_adv"] + 0.3 * ref["consistency"] + 0.7 * ref["coral"]
                + 1.9 * ref["mmd"])
        assert float(total_loss(got, cfg2)) == pytest.approx(want, rel=2e-4)


def test_adaptation_layer_starts_at_identity_and_folds_into_the_classifier(model):
    cfg = AdvTrainConfig(objective="xie")
    assert (cfg.beta, cfg.lambda_coral, cfg.lambda_mmd, cfg.adaptation, cfg.eps) == (1 / 3, 1 / 3, 1 / 3, True, 0.0112)
    assert AdvTrainConfig().adaptation is False and AdvTrainConfig().beta == 0.1  # Dong's defaults unchanged
    state = create_adv_train_state(model.module, model.variables, cfg, 1)
    a = state.params[ADAPTATION]
    np.testing.assert_array_equal(a["kernel"], np.eye(128, dtype=np.float32))
    np.testing.assert_array_equal(a["bias"], np.zeros(128, np.float32))
    x = jnp.asarray(digits_train().images[:4])
    from jaxroute.training.adversarial import _forward

    np.testing.assert_allclose(_forward(state, state.params, x, None)[0], model.logits(x), rtol=1e-5, atol=1e-6)
    for u, w in zip(jax.tree_util.tree_leaves(export_params(state.params, 10)),
                    jax.tree_util.tree_leaves(model.variables["params"])):
        np.testing.assert_array_equal(u, w)
    # a trained (non-identity) layer folds into the final linear layer: same logits
    rng = np.random.default_rng(1)
    params = {**state.params, ADAPTATION: {"kernel": jnp.asarray(rng.normal(size=(128, 128)) / 10, jnp.float32),
                                           "bias": jnp.asarray(rng.normal(size=128), jnp.float32)}}
    folded = model.with_variables({**model.variables, "params": export_params(params, 10)})
    np.testing.assert_allclose(folded.logits(x), _forward(state, params, x, None)[0], rtol=1e-4, atol=1e-4)


def test_kill_and_resume_gives_the_same_model(model, run_a, tmp_path):
    a, res = run_a
    assert len(res["epochs"]) == 2 and {"coral", "mmd", "seconds"} <= set(res["epochs"][-1])
    assert res["adaptation"] is not None and not np.allclose(res["adaptation"]["kernel"], np.eye(128))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    rec = json.loads((b / "progress.json").read_text())
    rec["epochs"] = rec["epochs"][:1]  # killed while saving epoch 2: its state folder is there, unrecorded
    (b / "progress.json").write_text(json.dumps(rec))
    res_b = fit(b, model)
    for u, w in zip(leaves_of(res), leaves_of(res_b)):
        np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="other settings"):
        adversarial_fit(model, digits_train(), AdvTrainConfig(objective="xie", epochs=2, batch_size=BATCH, lr=0.05,
                                                              lambda_mmd=0.5), b)


def test_two_devices_equal_one(run_a, ckpt, tmp_path):
    """The batch split over 2 CPU devices trains the same model as 1 device (up to float rounding)."""
    _, res = run_a
    other = 2 if jax.local_device_count() == 1 else 1
    out = tmp_path / "other"
    run_with_cpu_devices(other, "test_advtrain", "t.save_fit(argv[0], argv[1])", out, ckpt)
    with np.load(out / "result.npz") as z:
        got = [z[f"arr_{i}"] for i in range(len(z.files))]
    for u, w in zip(leaves_of(res), got):
        np.testing.assert_allclose(u, w, rtol=2e-4, atol=2e-5)


def test_config_rejects_bad_values():
    for kw, needle in [({"lambda_coral": -0.1}, "lambda_coral"), ({"lambda_mmd": float("inf")}, "lambda_mmd"),
                       ({"coral_norm": "l2"}, "coral_norm"), ({"mmd": "rbf"}, "mmd"), ({"objective": "madry"}, "objective"),
                       ({"eps": 0.0}, "eps"), ({"eps": 2.0}, "eps"), ({"adaptation": 1}, "adaptation"),
                       ({"objective": "xie", "feature": "conv3"}, "penultimate"),
                       ({"objective": "xie", "batch_size": 1}, "batch_size")]:
        with pytest.raises(ValueError, match=needle):
            AdvTrainConfig(**kw)
    # Dong's run identity holds only Dong's settings; Xie's leaves out Dong's attack
    assert set(AdvTrainConfig().identity()) == {"alpha", "beta", "steps", "step_eps", "target", "feature", "epochs",
                                                "batch_size", "lr", "momentum", "weight_decay", "grad_clip", "seed"}
    assert "lambda_coral" in AdvTrainConfig(lambda_coral=0.5).identity()
    assert not {"alpha", "steps", "step_eps", "target"} & set(AdvTrainConfig(objective="xie").identity())


@pytest.mark.parametrize("extra,needle", [(["--lambda-coral", "-0.5"], "lambda_coral"),
                                          (["--lambda-consistency", "-1"], "beta"),
                                          (["--coral-norm", "l2"], "coral_norm"), (["--mmd", "rbf"], "mmd")])
def test_cli_bad_input_is_one_line(extra, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXROUTE_DEBUG", raising=False)
    code = main(["adv-train", "--objective", "xie", "--model", "digits_cnn", "--limit", "16", "--out",
                 str(tmp_path / "o")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("jaxroute adv-train: error:") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_cli_xie_run(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["adv-train", "--objective", "xie", "--model", "digits_cnn", "--weights", str(ckpt), "--limit", "32",
            "--epochs", "1",
            "--batch-size", "16", "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("clean_top1", "fgsm_top1", "pgd_top1"):
        assert 0 <= res[k] <= 1
    assert set(res["losses"]) == {"loss", "ce_clean", "ce_adv", "consistency", "coral", "mmd"}
    assert res["seconds_per_epoch"] > 0 and res["eps"] == 0.0112 and res["pgd"]["steps"] == 10
    assert (out / "adaptation.npz").is_file()
    from jaxroute.weights import load_model

    assert load_model(None, out / "model").name == "digits_cnn"   # the plain architecture, layer folded in
