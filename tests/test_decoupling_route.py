"""Calculation paths of a decoupled model as route shards (``route --method controller``), the
other routers on a decoupled checkpoint, and ``decouple_step`` on 2 devices = 1."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_devices import run_with_cpu_devices

from jaxroute.cli.main import main
from jaxroute.decoupling.model import calculation_paths, decoupled_model, save_decoupled
from jaxroute.decoupling.train import DecoupleConfig
from jaxroute.extraction import load_manifest, load_shards
from jaxroute.models.gates import flatten_gates, ones_gates
from jaxroute.routing import DGRConfig, Route, route_outputs
from jaxroute.routing.controller import ControllerConfig, controller_route
from jaxroute.weights import load_model



def random_decoupled(name="digits_cnn", seed=0, **fields):
    """A decoupled model with weights drawn by numpy, not by the compiled Flax initialisers (on
    this CPU those compile for seconds even for the digits CNN): kernels N(0, 1/fan-in), biases
    and BN shifts N(0, 0.1), BN scales and variances in [0.5, 1.5], controller first layers
    N(0, 9) so that inputs take different paths."""
    from jaxroute.decoupling.model import decouple_module
    from jaxroute.models.gated import GatedModel
    from jaxroute.models.meta import default_meta
    from jaxroute.weights.loader import abstract_variables

    module = decouple_module(name, **fields)
    meta = default_meta(name, gate_placement="decouple")
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [getattr(p, "key", "") for p in path]
        if keys[-1] in ("var", "scale"):
            v = rng.uniform(0.5, 1.5, leaf.shape)
        elif keys[-1] == "kernel":
            std = 3.0 if "fc1" in keys else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
            v = rng.normal(0, std, leaf.shape)
        else:
            v = rng.normal(0, 0.1, leaf.shape)
        return np.asarray(v, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(module, meta.input_shape))
    return GatedModel(module, variables, meta)


@pytest.fixture(scope="module")
def dec_model():
    return random_decoupled()


def eval_paths(model, x):
    """The decoupled model's eval-mode paths, flat, computed directly (jitted: one compile)."""
    return np.asarray(jax.jit(lambda x: flatten_gates(model.spec, calculation_paths(model, x)))(x))


@pytest.fixture(scope="module")
def x_test():
    from jaxroute.data import load_dataset

    return jnp.asarray(load_dataset("digits", "test", limit=40).images)


def test_controller_route_is_the_eval_mode_path(dec_model, x_test):
    out = jax.device_get(route_outputs(dec_model, "controller")(x_test))
    assert set(out) == set(Route._fields) | {"features"}
    z = eval_paths(dec_model, x_test)
    assert z.shape == (40, 64 + 128) and len(np.unique(z, axis=0)) > 1  # paths differ between inputs
    np.testing.assert_array_equal(out["cdrp"], z)
    gated, full, feats = jax.device_get(jax.jit(lambda x: (
        dec_model.logits(x), dec_model.logits(x, ones_gates(dec_model.spec)), dec_model.capture(x).features))(x_test))
    np.testing.assert_allclose(out["gated_logits"], gated, atol=1e-5)
    np.testing.assert_allclose(out["full_logits"], full, atol=1e-5)
    np.testing.assert_array_equal(out["gated_pred"], gated.argmax(-1))
    assert not out["fell_back"].any() and not out["iterations"].any()
    p = jax.nn.softmax(full)
    loss = -np.sum(p * jax.nn.log_softmax(gated), -1) + 0.05 * z.sum(-1)
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(out["features"], feats, atol=1e-5)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        ControllerConfig(gamma=-1.0)


def test_controller_on_a_plain_model_names_the_missing_controllers(digits_model, x_test):
    plain = digits_model
    msg = r"needs a decoupled model .*has no architecture controllers; missing controller2, controller3$"
    with pytest.raises(ValueError, match=msg):
        route_outputs(plain, "controller")  # before anything is traced
    with pytest.raises(ValueError, match=msg):
        controller_route(plain, x_test)
    from jaxroute.models.gated import GatedModel
    from jaxroute.models.meta import default_meta
    from jaxroute.models.registry import create_model
    from jaxroute.weights.loader import abstract_variables

    module = create_model("resnet20")  # shapes only: the check runs before anything is computed
    r20 = GatedModel(module, abstract_variables(module, (32, 32, 3)), default_meta("resnet20"))
    with pytest.raises(ValueError, match=r"missing layer1_0/controller1, .*, layer3_2/controller2 \(18 in all\)"):
        route_outputs(r20, "controller")


def test_dgr_on_a_decoupled_model_routes_its_backbone_at_the_controlled_convs(dec_model, x_test):
    x = x_test[:8]
    out = jax.device_get(route_outputs(dec_model, "dgr", DGRConfig(steps=2))(x))
    assert out["cdrp"].shape == (8, dec_model.spec.size)
    np.testing.assert_allclose(out["full_logits"], dec_model.logits(x, ones_gates(dec_model.spec)), atol=1e-5)
    np.testing.assert_allclose(out["features"], np.asarray(dec_model.capture(x).features), atol=1e-5)


def test_decoupled_checkpoint_keeps_its_controller_fields(tmp_path):
    model = random_decoupled(reduction=2, semhash="official")
    save_decoupled(tmp_path / "dec", model)
    back = load_model(None, tmp_path / "dec")  # the route command's loader
    assert back.module.controller_reduction == 2 and back.module.semhash == "official"
    for a, b in zip(jax.tree.leaves(model.variables), jax.tree.leaves(back.variables)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- the command line
def _route(ckpt, out, data="digits", split="test", limit="40", *extra):
    return ["route", "--model", "digits_cnn", "--weights", str(ckpt), "--data", data, "--split", split,
            "--limit", limit, "--out", str(out), "--batch-size", "20", "--shard-size", "20", "--no-progress",
            *extra]


def test_decouple_route_controller_detect(digits_ckpt, tmp_path, x_test, capsys):
    """jaxroute decouple -> route --method controller -> detect, as a user chains them."""
    from jaxroute.data import load_dataset, save_arrays_split

    ckpt = tmp_path / "dec"
    # one epoch training the controllers of the trained digits CNN: one compiled step
    assert main(["decouple", "--model", "digits_cnn", "--weights", str(digits_ckpt), "--data", "digits", "--limit",
                 "64", "--out", str(ckpt), "--epochs", "1", "--batch-size", "32", "--freeze-backbone-epochs", "1",
                 "--no-augment"]) == 0
    # perturbed twins of the test images (any routable data set; an attack is no part of this chain)
    test = load_dataset("digits", "test", limit=40)
    noisy = np.clip(test.images + np.random.default_rng(0).uniform(-0.2, 0.2, test.images.shape), 0, 1)
    save_arrays_split(tmp_path / "noisy", "test", noisy.astype(np.float32), test.labels, test.class_names)
    outs = {}
    for kind, data in (("real", "digits"), ("noisy", str(tmp_path / "noisy"))):
        outs[kind] = tmp_path / kind
        assert main(_route(ckpt, outs[kind], data, "test", "40", "--method", "controller", "--json")) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "controller" and res["n"] == 40 and res["fallback_fraction"] == 0.0
    manifest = load_manifest(outs["real"])
    assert manifest["job"]["method"] == "controller" and manifest["job"]["gate_placement"] == "decouple"
    assert manifest["job"]["config"] == {"gamma": 0.05} and manifest["extra"]["cdrp_size"] == 64 + 128
    # the routed paths are the decoupled model's eval-mode z, computed directly
    model = decoupled_model(None, ckpt, key=jax.random.key(0))
    s = load_shards(outs["real"])
    np.testing.assert_array_equal(s["cdrp"], eval_paths(model, x_test))
    # detect reads them as it reads CDRPs (the same outputs for training and test: the plumbing, not a result)
    assert main(["detect", "--train-real", str(outs["real"]), "--train-adv", str(outs["noisy"]),
                 "--test-real", str(outs["real"]), "--test-adv", str(outs["noisy"]), "--sizes", "2",
                 "--runs", "1", "--classifiers", "random_forest", "--json"]) == 0
    det = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= det["random_forest"]["auc_mean"] <= 1.0
    # an option of another router is refused before any work
    assert main(_route(ckpt, tmp_path / "x", "digits", "test", "40", "--method", "controller", "--steps", "3")) == 2
    assert "--steps applies to dgr, not controller" in capsys.readouterr().err
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_route_controller_on_a_plain_checkpoint_is_a_one_line_error(digits_ckpt, tmp_path, capsys):
    out = tmp_path / "routes"
    assert main(_route(digits_ckpt, out, "digits", "test", "40", "--method", "controller")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "needs a decoupled model" in err and "missing controller2, controller3" in err
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------- 2 devices = 1
# the joint stage, whose batch-norm batch statistics and SemHash rows couple the samples of a batch
# (augmentation is per sample and only lengthens the compile)
CFG = DecoupleConfig(epochs=1, batch_size=32, flip=False, pad_crop=0)


def one_step(sharded: bool):
    """One joint-stage ``decouple_step`` (batch-norm batch statistics and SemHash over the whole
    batch), the batch split over the local devices or not; ``(state, metrics)`` as numpy."""
    from jaxroute.decoupling.train import _jitted_step, _shard, create_state

    model = random_decoupled()
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.uniform(size=(32, 8, 8, 1)), jnp.float32), jnp.asarray(rng.integers(0, 10, 32), jnp.int32))
    state, metrics = _jitted_step(create_state(model, CFG, False, 1), _shard(batch) if sharded else batch,
                                  jax.random.key(3), config=CFG, frozen=False)
    if sharded:
        assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == len(jax.local_devices())
    return jax.device_get(({"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state},
                           metrics))


def test_decouple_step_on_two_devices_equals_one(tmp_path):
    run_with_cpu_devices(2, "test_decoupling_route", "import pickle; pickle.dump(t.one_step(True), open(argv[0], 'wb'))",
                         tmp_path / "two.pkl")
    import pickle

    two = pickle.loads((tmp_path / "two.pkl").read_bytes())
    one = one_step(False)
    assert jax.tree.structure(two) == jax.tree.structure(one)
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=0, atol=1e-5)
