"""Network decoupling: SemHash, losses against a PyTorch transcription of the official loss code,
the decoupled models, training (kill / resume, NaN stop), MACs and the gathered forward."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxroute.decoupling import losses
from jaxroute.decoupling.controller import binarised_rows, semhash, semhash_parts
from jaxroute.decoupling.flops import (capacities, dense_macs, gathered_forward, macs_per_sample, xla_flops)
from jaxroute.decoupling.model import (calculation_paths, controller_outputs, decoupled_model, save_decoupled,
                                       split_controllers)
from jaxroute.decoupling.train import DecoupleConfig, evaluate, lr_boundaries, train_decoupled
from jaxroute.models.gates import flatten_gates, ones_gates
from jaxroute.models.registry import gate_spec
from jaxroute.weights import load_model

KEY = jax.random.key(0)


def _g(b=8, n=16, seed=0):
    g = np.random.default_rng(seed).normal(0, 2, (b, n)).astype(np.float32)
    g[0, :4] = [30, -30, 8, -8]  # saturated v1 entries
    return jnp.asarray(g)


# ---------------------------------------------------------------- SemHash
def test_semhash_values_and_half_rows():
    g = _g()
    for b in (8, 5):
        gb = g[:b]
        z = semhash(KEY, gb, True, "half")
        k_noise, k_rows = jax.random.split(KEY)
        v1, v2 = semhash_parts(k_noise, gb)
        s = gb + jax.random.normal(k_noise, gb.shape)
        np.testing.assert_allclose(v1, np.clip(1.2 / (1 + np.exp(-np.asarray(s))) - 0.1, 0, 1), atol=1e-6)
        np.testing.assert_array_equal(v2, np.asarray(s) > 0)
        rows = np.asarray(binarised_rows(k_rows, b, 16, "half"))
        assert rows.sum() == b // 2
        np.testing.assert_allclose(np.asarray(z)[rows], np.asarray(v2)[rows])
        np.testing.assert_allclose(np.asarray(z)[~rows], np.asarray(v1)[~rows], atol=1e-7)


def test_semhash_gradient_is_v1s():
    g = _g()
    w = jnp.asarray(np.random.default_rng(1).normal(size=g.shape).astype(np.float32))
    grad = jax.grad(lambda g: jnp.sum(semhash(KEY, g, True) * w))(g)
    s = np.asarray(g + jax.random.normal(jax.random.split(KEY)[0], g.shape), np.float64)
    sig = 1 / (1 + np.exp(-s))
    inside = (1.2 * sig - 0.1 > 0) & (1.2 * sig - 0.1 < 1)
    np.testing.assert_allclose(grad, np.asarray(w) * 1.2 * sig * (1 - sig) * inside, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[~inside] == 0) and (~inside).any()


def test_semhash_eval_ignores_key():
    g = _g()
    a, b = semhash(jax.random.key(1), g, False), semhash(jax.random.key(2), g, False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(g) > 0)
    with pytest.raises(ValueError, match="semhash mode"):
        semhash(KEY, g, True, "third")


def test_official_semhash_reproduces_the_code_draw():
    torch = pytest.importorskip("torch")
    for b, n in ((8, 16), (32, 16)):
        g = _g(b, n, seed=b)
        k_noise, k_rows = jax.random.split(KEY)
        index = np.asarray(jax.random.randint(k_rows, (n // 2,), 0, n))
        rows = np.asarray(binarised_rows(k_rows, b, n, "official"))
        np.testing.assert_array_equal(np.flatnonzero(rows), np.unique(index[index < b]))
        assert not rows[n:].any()  # rows >= N can never be binarised
        # the official forward (utils/utils.py) on the same noise and index
        v1, v2 = (torch.from_numpy(np.array(a)) for a in semhash_parts(k_noise, g))
        idx = torch.from_numpy(index[index < b]).long()  # PyTorch would raise on rows >= B
        v1[idx] = v2[idx]
        np.testing.assert_allclose(semhash(KEY, g, True, "official"), v1.numpy(), atol=1e-7)


# ---------------------------------------------------------------- losses vs the official code
def _torch_losses(z, ybar, mi_logits, labels, ratio, direction):
    """The official train_architecture_decouple loss terms, transcribed."""
    import torch
    import torch.nn.functional as F

    criterion = torch.nn.CrossEntropyLoss()
    target = torch.from_numpy(labels).long()
    kl_loss = s_loss = m_loss = 0
    for p in z:
        mask, out = torch.from_numpy(z[p]).double(), torch.from_numpy(ybar[p]).double()
        m_loss += criterion(torch.from_numpy(mi_logits[p]).double(), target)
        if direction == "z_y":   # resnet20 / vgg branches
            kl_loss += F.kl_div(F.log_softmax(out, 1), F.softmax(mask, 1))
        else:                    # resnet56 / resnet18 branches
            kl_loss += F.kl_div(F.log_softmax(mask, 1), F.softmax(out, 1))
        s_loss += torch.abs(torch.mean(torch.norm(mask, 1, 1)) - ratio * mask.shape[1])
    return float(m_loss), float(kl_loss), float(s_loss)


@pytest.mark.parametrize("direction", ["z_y", "y_z"])
def test_losses_match_official_code(direction):
    pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    z = {"a": rng.uniform(0, 1, (6, 16)), "b": (rng.uniform(size=(6, 32)) > 0.5).astype(float)}
    ybar = {p: rng.normal(size=v.shape) for p, v in z.items()}
    mi_logits = {p: rng.normal(size=(6, 10)) for p in z}
    labels = rng.integers(0, 10, 6)
    m, k, s = _torch_losses(z, ybar, mi_logits, labels, 0.3, direction)
    f32 = lambda t: {p: jnp.asarray(v, jnp.float32) for p, v in t.items()}  # noqa: E731
    np.testing.assert_allclose(losses.mi(f32(mi_logits), jnp.asarray(labels)), m, rtol=1e-5)
    np.testing.assert_allclose(losses.kl(f32(z), f32(ybar), direction), k, rtol=1e-5)
    np.testing.assert_allclose(losses.sparse(f32(z), 0.3), s, rtol=1e-5)
    # reductions: batchmean = per-sample KL, sum = N·B·mean
    n = sum(v.size for v in z.values())
    assert np.isclose(float(losses.kl(f32(z), f32(ybar), direction, "sum")),
                      sum(float(losses.kl({p: f32(z)[p]}, {p: f32(ybar)[p]}, direction)) * z[p].size for p in z),
                      rtol=1e-5) and n > 0
    with pytest.raises(ValueError, match="direction"):
        losses.kl(f32(z), f32(ybar), "x")


# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def digits_dec():
    return decoupled_model("digits_cnn", None, key=jax.random.key(1))


@pytest.fixture(scope="module")
def digits_data():
    from jaxroute.data import load_dataset

    return load_dataset("digits", "train", limit=96), load_dataset("digits", "test", limit=64)


def test_lr_milestones_that_round_to_one_epoch_both_decay():
    # 3 joint epochs: 0.5 and 0.75 both round to epoch 2, so the rate there is lr / 100
    assert lr_boundaries((0.5, 0.75), 3, 10, 0.1) == pytest.approx({20: 0.01})
    assert lr_boundaries((0.5, 0.75), 12, 10, 0.1) == pytest.approx({60: 0.1, 90: 0.1})
    sched = optax.piecewise_constant_schedule(0.01, lr_boundaries((0.5, 0.75), 3, 10, 0.1))
    assert [float(sched(s)) for s in (19, 20, 29)] == pytest.approx([0.01, 1e-4, 1e-4])


def test_init_selects_the_same_filters_for_every_input(digits_dec, digits_data):
    z = calculation_paths(digits_dec, jnp.asarray(digits_data[1].images[:16]))
    assert list(z) == ["conv2", "conv3"]
    for v in z.values():
        assert np.all(np.asarray(v) == np.asarray(v)[:1])


def test_z_ones_is_the_plain_backbone_and_names_are_unchanged(digits_dec, digits_data):
    x = jnp.asarray(digits_data[1].images[:8])
    plain = load_model("digits_cnn", None, key=jax.random.key(2))
    backbone, ctrl = split_controllers(digits_dec.variables["params"])
    dec = digits_dec.with_variables({**plain.variables, "params": {**plain.variables["params"], **ctrl}})
    np.testing.assert_allclose(dec.logits(x, ones_gates(dec.spec)), plain.logits(x), atol=1e-6)
    assert set(ctrl) == {"controller2", "controller3"}
    assert jax.tree.structure(backbone) == jax.tree.structure(plain.variables["params"])


def test_resnet20_gate_tree_has_672_entries():
    from jaxroute.decoupling.model import decouple_module

    spec = gate_spec(decouple_module("resnet20"), (32, 32, 3))
    assert spec.names[:2] == ("layer1.0.conv1", "layer1.0.conv2") and len(spec) == 18
    assert spec.size == 672


def test_bad_inputs_are_named(digits_dec, tmp_path):
    with pytest.raises(ValueError, match="resnet20, resnet32, resnet56, digits_cnn"):
        decoupled_model("vgg16", None, key=KEY)
    with pytest.raises(ValueError, match="not divisible by the reduction"):
        decoupled_model("digits_cnn", None, key=KEY, reduction=3)
    with pytest.raises(ValueError, match="lambda_s"):
        DecoupleConfig(lambda_s=-1)
    with pytest.raises(ValueError, match="target_ratio"):
        DecoupleConfig(target_ratio=1.5)
    save_decoupled(tmp_path / "dec", digits_dec)
    assert load_model(None, tmp_path / "dec").gate_placement == "decouple"
    with pytest.raises(Exception, match="controller2"):
        load_model(None, tmp_path / "dec", gate_placement="post_act")
    from jaxroute.weights.checkpoint import save_model

    plain = load_model("digits_cnn", None, key=KEY)
    save_model(tmp_path / "plain", plain.variables, plain.meta)
    with pytest.raises(Exception, match="controller3"):
        load_model(None, tmp_path / "plain", gate_placement="decouple")
    back = decoupled_model(None, tmp_path / "dec", key=KEY)
    np.testing.assert_array_equal(flatten_gates(back.spec, calculation_paths(back, jnp.zeros((2, 8, 8, 1)))),
                                  flatten_gates(back.spec, calculation_paths(digits_dec, jnp.zeros((2, 8, 8, 1)))))


# ---------------------------------------------------------------- training
# One configuration for every training test and the CLI test (its flags below): one compiled step.
CFG = DecoupleConfig(epochs=2, batch_size=32, freeze_backbone_epochs=1)


def test_kill_and_resume_give_identical_parameters(digits_dec, digits_data, tmp_path):
    train = digits_data[0]
    full, hist = train_decoupled(digits_dec, train, tmp_path / "a", CFG)
    part, _ = train_decoupled(digits_dec, train, tmp_path / "b", CFG, stop_after=1)
    resumed, hist_b = train_decoupled(digits_dec, train, tmp_path / "b", CFG)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert len(hist_b) == 2 and hist[0]["frozen_backbone"] and not hist[1]["frozen_backbone"]
    # the frozen stage left the backbone (and its BN statistics) untouched
    p0, _ = split_controllers(digits_dec.variables["params"])
    p1, _ = split_controllers(part["params"])
    for a, b in zip(jax.tree.leaves((p0, digits_dec.variables["batch_stats"])),
                    jax.tree.leaves((p1, part["batch_stats"]))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="another configuration"):
        train_decoupled(digits_dec, train, tmp_path / "b", DecoupleConfig(epochs=3, batch_size=32))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(digits_dec, digits_data, tmp_path):
    from jaxroute.data import Dataset

    train = digits_data[0]
    cfg = CFG
    train_decoupled(digits_dec, train, tmp_path / "r", cfg, stop_after=1)
    bad = Dataset(np.full_like(train.images, np.nan), train.labels, train.class_names, "nan")
    with pytest.raises(ValueError, match=r"loss term 'ce' is not finite in epoch 2.*epoch 1"):
        train_decoupled(digits_dec, bad, tmp_path / "r", cfg)
    assert json.loads((tmp_path / "r" / "progress.json").read_text())["epochs_done"] == 1
    assert (tmp_path / "r" / "train_state" / "epoch_00001").is_dir()


@pytest.mark.slow
def test_cli_run_reports_the_keys(tmp_path, capsys):
    from jaxroute.cli.main import main

    out = tmp_path / "run"
    argv = ["decouple", "--model", "digits_cnn", "--data", "digits", "--limit", "64", "--out", str(out),
            "--epochs", "2", "--batch-size", "32", "--freeze-backbone-epochs", "1", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("epochs_done", "test_top1", "test_top5", "loss_ce", "loss_mi", "loss_kl", "loss_sparse",
              "active_fraction", "macs_mean", "macs_reduction", "filter_states", "seconds_per_epoch"):
        assert k in res
    assert res["epochs_done"] == 2 and res["filter_states"]["energetic"] + res["filter_states"]["silent"] \
        + res["filter_states"]["dynamic"] == 64 + 128
    assert load_model(None, out).gate_placement == "decouple"
    assert main(argv) == 2  # a finished run is not overwritten
    assert main(argv[:2] + ["resnet18"] + argv[3:]) == 2


# ---------------------------------------------------------------- MACs and the gathered forward
def test_macs_from_z_and_xla_cost_analysis(digits_dec):
    plain = load_model("digits_cnn", None, key=KEY)
    analytic = dense_macs(digits_dec)
    flops = xla_flops(lambda x: plain.logits(x), jnp.zeros((1, 8, 8, 1)))
    # XLA counts the taps off the zero padding; BN, ReLU and pooling add < 2 %
    valid = dense_macs(digits_dec, exclude_padding=True)
    assert 0 <= flops / 2 - valid < 0.02 * valid, (flops / 2, valid)
    z = {"conv2": np.ones((2, 64)), "conv3": np.ones((2, 128))}
    z["conv2"][1, 32:] = 0
    z["conv3"][1, 64:] = 0
    m = macs_per_sample(digits_dec, z)
    ctrl = 32 * 8 + 8 * 64 + 64 * 16 + 16 * 128
    assert m[0] == analytic + ctrl
    assert m[1] == 64 * 9 * 1 * 32 + 64 * 9 * 32 * 32 + 16 * 9 * 32 * 64 + 64 * 10 + ctrl


def _random_controllers(model, seed=0):
    """Controllers with random first layers, so inputs take different paths."""
    rng = np.random.default_rng(seed)

    def perturb(path, v):
        names = [getattr(p, "key", "") for p in path]
        if any(n.startswith("controller") for n in names) and "fc1" in names and names[-1] == "kernel":
            return np.asarray(rng.normal(0, 3, v.shape), np.float32)
        return v

    params = jax.tree_util.tree_map_with_path(perturb, model.variables["params"])
    return model.with_variables({**model.variables, "params": params})


def test_gathered_forward_equals_masked_dense_logits():
    from jaxroute.data import as_dataset
    from jaxroute.models.gated import GatedModel
    from jaxroute.models.meta import default_meta
    from jaxroute.models.resnet_cifar import CifarResNet
    from jaxroute.models.registry import init_model

    # a decoupled CIFAR ResNet-8 (one block per stage: the ResNet-20 code path, a third of the compile)
    module = CifarResNet(depth=8, gate_placement="decouple")
    variables = jax.device_get(init_model(module, jax.random.key(4), (32, 32, 3)))
    model = _random_controllers(GatedModel(module, variables, default_meta("resnet20", gate_placement="decouple")))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(6, 32, 32, 3)).astype(np.float32))
    z = calculation_paths(model, x)
    assert any(np.ptp(np.asarray(v).sum(-1)) > 0 for v in z.values())  # paths differ between inputs
    caps = capacities({p: np.asarray(v)[:4] for p, v in z.items()}, quantile=0.5)
    f = jax.jit(gathered_forward(model, caps))
    dense = np.asarray(model.logits(x))
    overflow = 0
    for i in range(len(x)):
        logits, over = f(x[i:i + 1])
        overflow += int(over)
        np.testing.assert_allclose(logits[0], dense[i], rtol=1e-4, atol=1e-4)
    assert overflow > 0  # some layers ran over capacity and took the dense branch
    ev = evaluate(model, as_dataset(np.asarray(x), np.zeros(6, np.int32), tuple(str(i) for i in range(10))))
    assert ev["macs_reduction"] > 0 and 0 <= ev["active_fraction"] <= 1


def test_resnet20_dense_macs():
    from jaxroute.decoupling.model import decouple_module

    model = type("M", (), {"meta": type("Meta", (), {"arch": "resnet20"}), "num_classes": 10,
                           "module": decouple_module("resnet20")})
    assert dense_macs(model) == 40_551_040  # 40.55M, the usual ResNet-20 count


@pytest.mark.slow
def test_pretrained_resnet20_with_all_gates_on_is_the_plain_net(resnet20, cifar10_sample):
    x = jnp.asarray(cifar10_sample[0][:16].astype(np.float32) / 255)
    dec = decoupled_model("resnet20", resnet20.meta.source, key=KEY)
    np.testing.assert_allclose(dec.logits(x, ones_gates(dec.spec)), resnet20.logits(x), atol=1e-5)
    out = controller_outputs(dec, x)
    assert all(np.all(np.asarray(e["z"]) == np.asarray(e["z"])[:1]) for e in out.values())
