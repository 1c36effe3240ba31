"""Class-specific subnetworks: the K-class program, resume, selection, AUC, the `jaxroute subnet` command."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.routing.subnet import (SUBNETS, SubnetConfig, balanced_epoch, distill_subnets, distill_to_dir,
                                     load_subnets, select_snapshot, subnet_auc, subnet_loss)

SMALL = SubnetConfig(epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def digits_train():
    from jaxroute.data import load_dataset

    return load_dataset("digits", "train", limit=100)


@pytest.mark.parametrize("field,value", [("epochs", 0), ("lr", 0.0), ("gamma", -1.0), ("tau", 1.5),
                                         ("batch_size", 0), ("clip_max", -1.0), ("init", 11.0),
                                         ("lr", float("nan")), ("epochs", 2.5), ("seed", True),
                                         ("bce_reduction", "batchmean")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SubnetConfig(**{field: value})


def test_subnet_loss_mean_and_sum_against_a_float64_reference():
    rng = np.random.default_rng(0)
    logit, target = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    weight = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float64)  # padding rows carry weight 0
    gates = rng.uniform(0, 2, size=(2, 7))
    p = 1 / (1 + np.exp(-target))
    q = 1 / (1 + np.exp(-logit))
    bce = -(p * np.log(q) + (1 - p) * np.log(1 - q))
    l1 = 0.05 * np.abs(gates).sum(-1)
    for reduction, ce in (("mean", (weight * bce).sum(-1) / weight.sum(-1)), ("sum", (weight * bce).sum(-1))):
        total, got = subnet_loss(jnp.asarray(logit), jnp.asarray(target), jnp.asarray(weight), jnp.asarray(gates),
                                 0.05, reduction)
        np.testing.assert_allclose(got, ce, rtol=1e-6)
        np.testing.assert_allclose(total, ce + l1, rtol=1e-6)


def test_balanced_epoch_draws_all_positives_and_as_many_negatives():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
    key = jax.random.key(4)
    idx, w = balanced_epoch(key, labels, [0, 1, 2], batch_size=4)
    assert idx.shape == w.shape == (3, 4, 4)  # class 0: 7 + 7 images -> 4 batches of 4
    for k, c in enumerate([0, 1, 2]):
        members = idx[k][w[k] > 0]
        n_c = int(np.sum(labels == c))
        assert len(members) == 2 * n_c == len(set(members.tolist()))
        assert np.sum(labels[members] == c) == n_c
    alone_idx, alone_w = balanced_epoch(key, labels, [1], batch_size=4)
    steps = alone_idx.shape[1]
    np.testing.assert_array_equal(alone_idx[0], idx[1, :steps])
    np.testing.assert_array_equal(alone_w[0], w[1, :steps])
    assert not w[1, steps:].any()
    other, _ = balanced_epoch(jax.random.key(5), labels, [0, 1, 2], batch_size=4)
    assert not np.array_equal(other, idx)


def test_select_snapshot_known_answers():
    loss = np.array([[3.0, 1.0, 5.0], [2.0, 2.0, 4.0], [1.0, 3.0, 6.0]])
    sparsity = np.array([[0.4, 0.6, 0.9], [0.5, 0.3, 0.8], [0.7, 0.2, 0.8]])
    idx, fallback = select_snapshot(loss, sparsity, 0.5)
    # class 0: epochs 0 and 1 are <= 0.5, epoch 1 has the lower loss; class 1: epochs 1, 2 -> epoch 1;
    # class 2: none <= 0.5 -> the sparsest (0.8 twice) with the lower loss -> epoch 1
    np.testing.assert_array_equal(idx, [1, 1, 1])
    np.testing.assert_array_equal(fallback, [False, False, True])


def float64_model(model):
    return model.with_variables(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.variables))


def test_one_class_alone_equals_the_same_class_among_all(digits_model, digits_train):
    """The K-class program is K independent distillations: in float64, class 3 alone = row 3 of all ten."""
    with jax.enable_x64():
        m64 = float64_model(digits_model)
        x = np.asarray(digits_train.images, np.float64)
        y = digits_train.labels
        alone = distill_subnets(m64, x, y, config=SMALL, classes=[3])
        every = distill_subnets(m64, x, y, config=SMALL)
    assert alone.snapshot_gates.dtype == np.float64
    np.testing.assert_allclose(alone.snapshot_gates[:, 0], every.snapshot_gates[:, 3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(alone.snapshot_loss[:, 0], every.snapshot_loss[:, 3], rtol=1e-10)
    np.testing.assert_allclose(alone.train_loss[:, 0], every.train_loss[:, 3], rtol=1e-10)
    np.testing.assert_array_equal(alone.snapshot_sparsity[:, 0], every.snapshot_sparsity[:, 3])
    # the gates moved: the L1 term and Adam did something
    assert np.all(every.snapshot_sparsity[-1] < 1) or np.any(every.snapshot_gates[-1] != 1)


def test_resume_equals_uninterrupted(digits_model, digits_train, tmp_path):
    straight = distill_to_dir(digits_model, digits_train, tmp_path / "a", config=SMALL)

    class Killed(Exception):
        pass

    def kill(state):
        raise Killed

    with pytest.raises(Killed):
        distill_to_dir(digits_model, digits_train, tmp_path / "b", config=SMALL, on_epoch=kill)
    assert not (tmp_path / "b" / SUBNETS).exists()
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["epochs_done"] == 1
    epochs_run = []
    resumed = distill_to_dir(digits_model, digits_train, tmp_path / "b", config=SMALL,
                             on_epoch=lambda s: epochs_run.append(s.epochs_done))
    assert epochs_run == [2]
    for name, a, b in zip(straight._fields, straight, resumed):
        np.testing.assert_array_equal(a, b, err_msg=name)
    on_disk = load_subnets(tmp_path / "b", digits_model)
    np.testing.assert_array_equal(on_disk.gates, straight.gates)
    assert straight.gates.shape == (10, digits_model.spec.size)
    k = np.arange(10)
    np.testing.assert_array_equal(straight.gates, straight.snapshot_gates[straight.selected_epoch - 1, k])
    assert np.all((straight.sparsity <= SMALL.tau) | straight.fallback)
    # a finished folder keeps only the result, and is read back, not run again
    assert not (tmp_path / "b" / "state.npz").exists()
    again = distill_to_dir(digits_model, digits_train, tmp_path / "b", config=SMALL,
                           on_epoch=lambda s: epochs_run.append(s.epochs_done))
    assert epochs_run == [2]
    for name, a, b in zip(straight._fields, straight, again):
        np.testing.assert_array_equal(a, b, err_msg=name)
    # another configuration in the same folder is refused, not mixed
    with pytest.raises(ValueError, match="other arguments"):
        distill_to_dir(digits_model, digits_train, tmp_path / "b", config=SubnetConfig(epochs=3, batch_size=8))


def test_load_subnets_refuses_another_model(digits_model, tmp_path):
    np.savez(tmp_path / SUBNETS, **{n: np.zeros((2, 5)) for n in
                                   ("gates", "snapshot_gates", "snapshot_loss", "snapshot_sparsity", "train_loss")},
             sparsity=np.zeros(2), selected_epoch=np.ones(2), fallback=np.zeros(2, bool), classes=np.arange(2))
    with pytest.raises(ValueError, match="gates per subnetwork"):
        load_subnets(tmp_path, digits_model)
    with pytest.raises(FileNotFoundError):
        load_subnets(tmp_path / "absent", digits_model)


def test_auc_with_all_ones_gates_equals_the_full_model(digits_model, digits_test):
    gates = np.ones((10, digits_model.spec.size), np.float32)
    full, sub = subnet_auc(digits_model, gates, digits_test.images[:100], digits_test.labels[:100])
    np.testing.assert_allclose(full, sub, atol=1e-6)
    assert np.all(full > 0.9)  # the trained digits CNN separates its classes
    half = gates.copy()
    half[:, ::2] = 0
    _, sub = subnet_auc(digits_model, half, digits_test.images[:100], digits_test.labels[:100])
    assert not np.allclose(full, sub)


def test_cli_subnet(digits_ckpt, tmp_path, capsys):
    from jaxroute.cli.main import main

    out = tmp_path / "subnets"
    argv = ["subnet", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit", "100",
            "--epochs", "2", "--batch-size", "8", "--out", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_classes"] == 10
    for name in ("sparsity_per_class", "selected_epoch", "auc_full", "auc_subnet"):
        assert len(res[name]) == 10
    assert 0 <= res["sparsity_mean"] <= 1
    assert set(res["fallback_classes"]) <= set(range(10))
    assert (out / SUBNETS).exists() and (out / "summary.json").exists()
    assert main(argv) == 0  # finished folder: resumes with nothing left to do, same result
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["sparsity_per_class"] == res["sparsity_per_class"]
    assert main(argv[:-3] + ["--tau", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "tau" in capsys.readouterr().err


@pytest.mark.slow
def test_pretrained_resnet20_subnets_keep_their_auc(resnet20, cifar10_jpeg):
    """Real subnetworks of the pretrained CIFAR-10 ResNet-20, library defaults, 500 training images per class:
    each class's subnetwork keeps its one-vs-rest AUC within 2 points, sparsity <= tau or flagged."""
    from jaxroute.data import load_dataset

    train = load_dataset(str(cifar10_jpeg), "train", limit=5000)
    test = load_dataset(str(cifar10_jpeg), "test", limit=2000)
    res = distill_subnets(resnet20, train.images, train.labels)
    assert np.all((res.sparsity <= 0.5) | res.fallback)
    full, sub = subnet_auc(resnet20, res.gates, test.images, test.labels)
    assert np.all(np.abs(full - sub) <= 0.02), (full, sub)
