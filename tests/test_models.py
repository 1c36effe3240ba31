"""Gate-aware models: gate specs, gate trees, gating semantics, input errors, the GatedModel.

Every registered model is checked in both gate placements on small random
inputs (ImageNet nets at 32 or 64 px), with random weights.
"""
from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.models import (
    GATE_PLACEMENTS, Capture, GatedModel, GateSpec, check_gates, create_model, default_meta, flatten_gates,
    gate_spec, init_model, list_models, model_card, ones_gates, unflatten_gates,
)

# Small test input (H, W, C) for each model; AlexNet needs >= 63 px,
# the CIFAR VGG needs exactly 32 px (its classifier takes 512 = 512x1x1 features).
TEST_SHAPES = {
    "resnet20": (32, 32, 3), "resnet32": (32, 32, 3), "resnet44": (32, 32, 3),
    "resnet56": (32, 32, 3), "vgg16": (32, 32, 3), "vgg16_bn_cifar": (32, 32, 3),
    "alexnet": (64, 64, 3), "resnet18": (32, 32, 3), "resnet50": (32, 32, 3),
    "digits_cnn": (8, 8, 1),
}
MODELS = sorted(TEST_SHAPES)
BATCH = 2


# ---------------------------------------------------------------- expected specs
# Written from the architecture descriptions (the docstrings of the modules),
# independently of the code that builds the models.

def _cifar_resnet_spec(depth, placement):
    n = (depth - 2) // 6
    if placement == "block":  # only each block's output, after the residual ReLU
        return ([f"layer{s}.{b}" for s in (1, 2, 3) for b in range(n)],
                [planes for planes in (16, 32, 64) for _ in range(n)])
    names, chans = ["conv1"], [16]
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            second = f"layer{s}.{b}" if placement == "post_act" else f"layer{s}.{b}.conv2"
            names += [f"layer{s}.{b}.conv1", second]
            chans += [planes, planes]
    return names, chans


def _imagenet_resnet_spec(depth, placement):
    blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
    if placement == "block":
        out = 4 if bottleneck else 1
        return ([f"layer{s}.{b}" for s, nb in enumerate(blocks, start=1) for b in range(nb)],
                [planes * out for planes, nb in zip((64, 128, 256, 512), blocks) for _ in range(nb)])
    names, chans = ["conv1"], [64]
    for s, (planes, nb) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(nb):
            p = f"layer{s}.{b}"
            if bottleneck:
                inner = [(f"{p}.conv1", planes), (f"{p}.conv2", planes)]
                last = (f"{p}.conv3", planes * 4)
            else:
                inner = [(f"{p}.conv1", planes)]
                last = (f"{p}.conv2", planes)
            out = (p, last[1]) if placement == "post_act" else last
            for nm, c in inner + [out]:
                names.append(nm)
                chans.append(c)
    return names, chans


def _vgg_spec(bn, hidden, fc=False):
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    names, chans, i = [], [], 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        names.append(f"features.{i}")
        chans.append(v)
        i += 3 if bn else 2
    if fc:  # the hidden fully connected layers too (gate_fc=True); the paper's CDRP is the conv channels
        return names + ["classifier.0", "classifier.3"], chans + [hidden, hidden]
    return names, chans


def expected_spec(name, placement):
    if name in ("resnet20", "resnet32", "resnet44", "resnet56"):
        return _cifar_resnet_spec(int(name[6:]), placement)
    if name in ("resnet18", "resnet50"):
        return _imagenet_resnet_spec(int(name[6:]), placement)
    if name == "vgg16":
        return _vgg_spec(False, 4096)
    if name == "vgg16_bn_cifar":
        return _vgg_spec(True, 512)
    if name == "alexnet":
        return [f"features.{i}" for i in (0, 3, 6, 8, 10)], [64, 192, 384, 256, 256]
    if name == "digits_cnn":
        return ["conv1", "conv2", "conv3"], [32, 64, 128]
    raise KeyError(name)


# ---------------------------------------------------------------- fixtures

_VARS: dict[str, dict] = {}
_FWD: dict[tuple[str, str], object] = {}
_SPECS: dict[tuple[str, str], GateSpec] = {}


def spec_for(name, placement="post_act"):
    """``gate_spec`` of a model at its test input shape, cached."""
    if (name, placement) not in _SPECS:
        _SPECS[name, placement] = gate_spec(create_model(name, gate_placement=placement), TEST_SHAPES[name])
    return _SPECS[name, placement]


def variables_for(name):
    """Random variables for ``name``, cached (they do not depend on the gate placement).

    Drawn with numpy on the shapes from ``jax.eval_shape`` (no compilation),
    then put on the device once (VGG-16 holds 138M parameters):
    He-scaled kernels, small random biases, and random BN scale, shift and
    running statistics, so that BN is not an identity.
    """
    if name not in _VARS:
        model = create_model(name)
        shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                                jax.ShapeDtypeStruct((1, *TEST_SHAPES[name]), jnp.float32))
        rng = np.random.default_rng(0)

        def draw(path, s):
            leaf, shape = path[-1].key, s.shape
            if leaf == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                a = np.float32(np.sqrt(6.0 / fan_in))  # He-uniform
                return (rng.random(shape, dtype=np.float32) * 2 - 1) * a
            if leaf == "scale":
                return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            if leaf in ("bias", "mean"):
                return (0.1 * rng.standard_normal(shape)).astype(np.float32)
            if leaf == "var":
                return (0.5 + rng.random(shape)).astype(np.float32)
            raise AssertionError(f"unexpected variable {path}")

        _VARS[name] = jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))
    return _VARS[name]


# Run eagerly (op by op) where that is cheaper than compiling: JAX caches each
# primitive by shape, so the CIFAR ResNets of all depths, both gate placements
# and all gate-tree shapes share one set of compiled kernels.  VGG-16 and
# AlexNet (big dense layers, many adaptive-pool slices) are faster jitted.
JIT_MODELS = {"vgg16", "alexnet"}


def forward(name, placement="post_act"):
    """``(variables, x, gates) -> (logits, capture)`` for a model, cached."""
    if (name, placement) not in _FWD:
        model = create_model(name, gate_placement=placement)

        def fwd(v, x, g):
            return model.apply(v, x, gates=g, capture=True)

        _FWD[name, placement] = jax.jit(fwd) if name in JIT_MODELS else fwd
    return _FWD[name, placement]


def trace(name, x, gates=None, placement="post_act"):
    """Trace a forward pass abstractly (shape checks and gate errors, no compute)."""
    model = create_model(name, gate_placement=placement)
    return jax.eval_shape(lambda v, x, g: model.apply(v, x, gates=g), variables_for(name), x, gates)


def images(name, batch=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.random((batch, *TEST_SHAPES[name]), dtype=np.float32))


def close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


@pytest.fixture(params=[(m, p) for m in MODELS for p in GATE_PLACEMENTS],
                ids=lambda mp: f"{mp[0]}-{mp[1]}")
def model_case(request):
    name, placement = request.param
    model = create_model(name, gate_placement=placement)
    return name, placement, model, variables_for(name), spec_for(name, placement)


# Heavier semantic checks run on one model of each family (both placements);
# resnet32/44/56 differ from resnet20 only in the number of blocks.
FAMILY = ["resnet20", "vgg16", "vgg16_bn_cifar", "alexnet", "resnet18", "resnet50", "digits_cnn"]


@pytest.fixture(params=[(m, p) for m in FAMILY for p in GATE_PLACEMENTS],
                ids=lambda mp: f"{mp[0]}-{mp[1]}")
def family_case(request):
    name, placement = request.param
    model = create_model(name, gate_placement=placement)
    return name, placement, model, variables_for(name), spec_for(name, placement)


# ---------------------------------------------------------------- registry

def test_registry_lists_every_model():
    assert set(list_models()) == set(MODELS)
    for name in MODELS:
        card = model_card(name)
        assert card.name == name and len(card.mean) == len(card.std) == card.input_shape[-1]


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20"):
        create_model("resnet21")
    with pytest.raises(ValueError, match="unknown model"):
        model_card("nope")


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "alexnet", "resnet18", "digits_cnn"])
def test_bad_gate_placement(name):
    model = create_model(name, gate_placement="pre_act")
    x = jnp.zeros((1, *TEST_SHAPES[name]), jnp.float32)
    with pytest.raises(ValueError, match=r"gate_placement must be one of .*'pre_act'"):
        model.init(jax.random.key(0), x)


def test_create_model_overrides():
    m = create_model("resnet20", num_classes=7, gate_placement="conv", mean=(0.5,) * 3, std=(0.25,) * 3)
    assert (m.num_classes, m.gate_placement, tuple(m.mean), tuple(m.std)) == (7, "conv", (0.5,) * 3, (0.25,) * 3)
    out = jax.eval_shape(lambda x: m.apply(m.init(jax.random.key(0), x), x), jnp.zeros((3, 32, 32, 3)))
    assert out.shape == (3, 7)


def test_init_model():
    m = create_model("digits_cnn")
    v = init_model(m, jax.random.key(0), (8, 8, 1))
    assert set(v) == {"params", "batch_stats"}
    assert v["params"]["conv1"]["kernel"].shape == (3, 3, 1, 32)
    assert v["params"]["linear"]["kernel"].shape == (128, 10)
    assert m.apply(v, jnp.zeros((2, 8, 8, 1))).shape == (2, 10)


def test_model_normalizes_inside():
    """Pixel-space input: the model with mean/std m, s on x equals the model with
    mean 0, std 1 on (x - m) / s."""
    name = "resnet20"
    v = variables_for(name)
    card = model_card(name)
    x = images(name)
    a, _ = forward(name)(v, x, None)
    xn = (x - jnp.asarray(card.mean)) / jnp.asarray(card.std)
    b = jax.jit(create_model(name, mean=(0.0,) * 3, std=(1.0,) * 3).apply)(v, xn)
    close(a, b)


# ---------------------------------------------------------------- gate specs

def test_gate_spec_matches_architecture(model_case):
    name, placement, model, _, spec = model_case
    names, chans = expected_spec(name, placement)
    assert isinstance(spec, GateSpec)
    assert spec.names == tuple(names)
    assert spec.channels == tuple(chans)
    assert spec.size == sum(chans) and len(spec) == len(names)
    assert spec.offsets == tuple(int(o) for o in np.cumsum([0] + chans[:-1]))
    assert spec.layer_index().shape == (spec.size,)
    assert [d["name"] for d in spec.layout()] == names


@pytest.mark.parametrize("name,placement,points,size", [
    ("resnet20", "post_act", 19, 688), ("resnet20", "conv", 19, 688),
    ("resnet32", "post_act", 31, 1136), ("resnet56", "post_act", 55, 2032),
    ("resnet20", "block", 9, 336), ("resnet56", "block", 27, 1008),
    ("vgg16", "post_act", 13, 4224), ("vgg16", "conv", 13, 4224),
    ("vgg16_bn_cifar", "post_act", 13, 4224), ("alexnet", "post_act", 5, 1152),
    ("resnet18", "post_act", 17, 3904), ("resnet18", "block", 8, 1920), ("resnet50", "post_act", 49, 22720),
    ("resnet50", "conv", 49, 22720), ("resnet50", "block", 16, 15104), ("digits_cnn", "post_act", 3, 224),
])
def test_gate_spec_sizes(name, placement, points, size):
    spec = gate_spec(create_model(name, gate_placement=placement), TEST_SHAPES[name])
    assert (len(spec), spec.size) == (points, size)


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet18", "resnet50"])
def test_block_placement_gates_only_block_outputs(name):
    """The official DGR code's ResNet gates: each block's output after the residual ReLU, nothing else."""
    spec = spec_for(name, "block")
    names, chans = expected_spec(name, "block")
    assert (spec.names, spec.channels) == (tuple(names), tuple(chans))
    v, x = variables_for(name), images(name)
    fwd = forward(name, "block")
    base_logits, base = fwd(v, x, None)
    g = ones_gates(spec)
    point = spec.names[-1]
    g[point] = jnp.zeros_like(g[point])
    logits, cap = fwd(v, x, g)
    assert np.all(np.asarray(cap["gates"][point]) == 0.0)
    bias = np.asarray(v["params"]["fc" if name in ("resnet18", "resnet50") else "linear"]["bias"])
    close(logits, np.broadcast_to(bias, np.shape(logits)), 1e-6)  # nothing reaches the classifier


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn_cifar", "alexnet", "digits_cnn"])
def test_block_placement_only_for_residual_networks(name):
    x = jnp.zeros((1, *TEST_SHAPES[name]), jnp.float32)
    with pytest.raises(ValueError, match=r"gate_placement must be one of \('post_act', 'conv'(, 'decouple')?\)"):
        create_model(name, gate_placement="block").init(jax.random.key(0), x)


@pytest.mark.parametrize("name,hidden", [("vgg16", 4096), ("vgg16_bn_cifar", 512)])
def test_vgg_gates_fully_connected_layers_only_on_request(name, hidden):
    names, chans = _vgg_spec(name.endswith("_cifar"), hidden, fc=True)
    spec = gate_spec(create_model(name, gate_fc=True), TEST_SHAPES[name])
    assert (spec.names, spec.channels) == (tuple(names), tuple(chans))
    assert "classifier.0" not in spec_for(name).names
    alex = gate_spec(create_model("alexnet", gate_fc=True), TEST_SHAPES["alexnet"])
    assert alex.names[-2:] == ("classifier.1", "classifier.4") and alex.size == 1152 + 2 * 4096


def test_gate_spec_resnet20_names_in_forward_order():
    spec = gate_spec(create_model("resnet20"), (32, 32, 3))
    assert spec.names[:4] == ("conv1", "layer1.0.conv1", "layer1.0", "layer1.1.conv1")
    assert spec.names[-2:] == ("layer3.2.conv1", "layer3.2")
    assert spec.channels[:3] == (16, 16, 16) and spec.channels[-1] == 64
    conv = gate_spec(create_model("resnet20", gate_placement="conv"), (32, 32, 3))
    assert conv.names[:3] == ("conv1", "layer1.0.conv1", "layer1.0.conv2")


def test_gate_spec_independent_of_image_size():
    for name, big in (("resnet20", (48, 40, 3)), ("resnet18", (64, 64, 3)), ("alexnet", (96, 96, 3))):
        m = create_model(name)
        assert gate_spec(m, TEST_SHAPES[name]) == gate_spec(m, big)


# ---------------------------------------------------------------- gating semantics

def test_none_equals_all_ones(model_case):
    name, placement, model, v, spec = model_case
    x = images(name)
    fwd = forward(name, placement)
    ref, cap = fwd(v, x, None)
    assert ref.shape == (BATCH, model_card(name).num_classes)
    assert np.all(np.isfinite(np.asarray(ref)))
    assert sorted(cap["gates"]) == sorted(spec.names)
    for g in (ones_gates(spec), ones_gates(spec, batch=BATCH)):
        out, cap_g = fwd(v, x, g)
        close(out, ref, 1e-6)
        close(cap_g["features"], cap["features"], 1e-6)
        for n in spec.names:
            close(cap_g["gates"][n], cap["gates"][n], 1e-6)


def test_capture_in_forward_order():
    """The module builds capture["gates"] in forward order (before any pytree sort)."""
    for name, placement in (("resnet20", "post_act"), ("resnet50", "conv"), ("vgg16_bn_cifar", "post_act")):
        model = create_model(name, gate_placement=placement)
        order = []

        def f(v, x):
            _, cap = model.apply(v, x, capture=True)
            order.extend(cap["gates"])
            return cap["features"]

        jax.eval_shape(f, variables_for(name), images(name))
        assert tuple(order) == spec_for(name, placement).names


def test_zero_gate_silences_channel(family_case):
    name, placement, model, v, spec = family_case
    x = images(name)
    fwd = forward(name, placement)
    base_logits, base = fwd(v, x, None)
    # A point in the middle of the net and the last one (just before the classifier).
    for idx in (len(spec) // 2, len(spec) - 1):
        point, c = spec.names[idx], spec.channels[idx]
        # the most active channel there (a random net may have dead ReLU channels)
        a0 = np.abs(np.asarray(base["gates"][point])).reshape(-1, c)
        ch = int(a0.sum(axis=0).argmax())
        g = ones_gates(spec)
        g[point] = g[point].at[ch].set(0.0)
        logits, cap = fwd(v, x, g)
        act = np.asarray(cap["gates"][point])
        assert np.all(act[..., ch] == 0.0), f"{name}/{placement}: {point}[{ch}] not silenced"
        # the other channels are untouched at that point
        others = np.delete(np.arange(c), ch)
        close(act[..., others], np.asarray(base["gates"][point])[..., others], 1e-6)
        # the channel was active, so silencing it changes the output
        assert np.any(a0[:, ch] != 0.0)
        if placement == "post_act":  # (after a "conv" gate, BN and ReLU may hide the change)
            assert not np.allclose(np.asarray(logits), np.asarray(base_logits))


def test_all_zero_post_act_gate_kills_signal():
    """Zeroing every channel of the last post_act point makes the logits the bias."""
    name = "resnet20"
    v = variables_for(name)
    spec = spec_for(name)
    g = ones_gates(spec)
    g[spec.names[-1]] = jnp.zeros_like(g[spec.names[-1]])
    logits, cap = forward(name)(v, images(name), g)
    np.testing.assert_array_equal(np.asarray(cap["features"]), 0.0)
    np.testing.assert_allclose(np.asarray(logits),
                               np.broadcast_to(np.asarray(v["params"]["linear"]["bias"]), logits.shape))


# "conv" placement changes only where the gates sit, not how they broadcast:
# check it on the nets with BN, where the two placements differ.
PER_SAMPLE_CASES = [(m, "post_act") for m in FAMILY] + [
    (m, "conv") for m in ("resnet20", "vgg16_bn_cifar", "resnet18")]


@pytest.mark.parametrize("name,placement", PER_SAMPLE_CASES)
def test_per_sample_gates_equal_single_runs(name, placement):
    """(B, C) gates: sample i sees exactly its own gate vector.  Inference is
    per-sample (BN uses running statistics), so running the batch with the
    shared (C,) gates of sample i and keeping row i is running sample i alone
    (literally checked in test_per_sample_gates_equal_batch_of_one)."""
    v, spec = variables_for(name), spec_for(name, placement)
    x = images(name, batch=BATCH)
    rng = np.random.default_rng(3)
    flat = rng.uniform(0.0, 2.0, (BATCH, spec.size)).astype(np.float32)
    flat[flat < 0.3] = 0.0  # some hard zeros too
    fwd = forward(name, placement)
    out, cap = fwd(v, x, unflatten_gates(spec, flat))
    for i in range(BATCH):
        oi, ci = fwd(v, x, unflatten_gates(spec, flat[i]))
        close(out[i], oi[i])
        close(cap["features"][i], ci["features"][i])
        for n in (spec.names[0], spec.names[len(spec) // 2], spec.names[-1]):
            close(cap["gates"][n][i], ci["gates"][n][i])
    # and the gates do matter
    assert not np.allclose(np.asarray(out), np.asarray(fwd(v, x, None)[0]))


@pytest.mark.parametrize("placement", GATE_PLACEMENTS)
def test_per_sample_gates_equal_batch_of_one(placement):
    """The same, literally: each sample alone in a batch of one with its (C,) gates."""
    name = "resnet20"
    v, spec = variables_for(name), spec_for(name, placement)
    x = images(name, seed=7)
    flat = np.random.default_rng(4).uniform(0.0, 2.0, (BATCH, spec.size)).astype(np.float32)
    fwd = forward(name, placement)
    out, cap = fwd(v, x, unflatten_gates(spec, flat))
    for i in range(BATCH):
        oi, ci = fwd(v, x[i : i + 1], unflatten_gates(spec, flat[i]))
        close(out[i : i + 1], oi)
        close(cap["gates"][spec.names[-1]][i : i + 1], ci["gates"][spec.names[-1]])


def test_gated_forward_under_jit():
    """Gates from a flat CDRP vector under jit, and their gradient (what DGR optimizes)."""
    name = "resnet20"
    model = create_model(name)
    v, spec = variables_for(name), spec_for(name)
    flat = jnp.asarray(np.random.default_rng(5).uniform(0.0, 1.0, spec.size).astype(np.float32))
    x = images(name)
    f = jax.jit(jax.value_and_grad(lambda fl: model.apply(v, x, gates=unflatten_gates(spec, fl))[:, 0].sum()))
    val, gr = f(flat)
    close(val, forward(name)(v, x, unflatten_gates(spec, flat))[0][:, 0].sum())
    assert gr.shape == (spec.size,) and np.all(np.isfinite(np.asarray(gr)))
    assert np.any(np.asarray(gr) != 0)


# ---------------------------------------------------------------- flatten / unflatten

@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn_cifar", "digits_cnn"])
def test_flatten_unflatten_round_trip(name):
    spec = spec_for(name)
    for lead in ((), (3,)):
        flat = jax.random.normal(jax.random.key(0), (*lead, spec.size))
        tree = unflatten_gates(spec, flat)
        assert list(tree) == list(spec.names)
        for n, c in spec:
            assert tree[n].shape == (*lead, c)
        np.testing.assert_array_equal(np.asarray(flatten_gates(spec, tree)), np.asarray(flat))
        # forward order, not sorted order: the first block is the first gate point
        o = spec.offsets[1]
        np.testing.assert_array_equal(np.asarray(tree[spec.names[1]]),
                                      np.asarray(flat[..., o : o + spec.channels[1]]))
        # tree -> flat -> tree, also for a dict whose keys are in another order
        shuffled = {n: tree[n] for n in sorted(tree, reverse=True)}
        back = unflatten_gates(spec, flatten_gates(spec, shuffled))
        for n in spec.names:
            np.testing.assert_array_equal(np.asarray(back[n]), np.asarray(tree[n]))
    ones = flatten_gates(spec, ones_gates(spec))
    assert ones.shape == (spec.size,) and bool(jnp.all(ones == 1))
    assert ones_gates(spec, batch=4)[spec.names[0]].shape == (4, spec.channels[0])


def test_unflatten_wrong_length():
    spec = spec_for("resnet20")
    with pytest.raises(ValueError, match=r"687 entries.*688"):
        unflatten_gates(spec, jnp.zeros(687))


def test_check_gates_reports_every_problem():
    spec = spec_for("resnet20")
    check_gates(spec, None)
    check_gates(spec, ones_gates(spec))
    check_gates(spec, ones_gates(spec, batch=3), batch=3)
    g = ones_gates(spec)
    del g["layer2.1"]
    g["layer9.9"] = jnp.ones(16)
    g["layer1.0.conv1"] = jnp.ones(17)
    with pytest.raises(ValueError) as e:
        check_gates(spec, g)
    msg = str(e.value)
    assert "missing" in msg and "'layer2.1'" in msg
    assert "unexpected" in msg and "'layer9.9'" in msg
    assert "wrong shape" in msg and "layer1.0.conv1" in msg and "(17,)" in msg
    with pytest.raises(ValueError, match="layer1.0"):
        check_gates(spec, ones_gates(spec, batch=3), batch=2)
    with pytest.raises(TypeError, match="dict"):
        check_gates(spec, [1.0] * spec.size)
    with pytest.raises(ValueError, match="missing"):
        flatten_gates(spec, {"conv1": jnp.ones(16)})


# ---------------------------------------------------------------- errors in the forward pass

ERROR_MODELS = ["resnet20", "vgg16_bn_cifar", "alexnet", "resnet18", "digits_cnn"]


@pytest.mark.parametrize("name", ERROR_MODELS)
def test_wrong_gate_name(name):
    spec = spec_for(name)
    g = ones_gates(spec)
    g["not.a.point"] = jnp.ones(3)
    with pytest.raises(ValueError, match=r"unexpected gate points \['not\.a\.point'\]"):
        trace(name, images(name), g)


@pytest.mark.parametrize("name", ERROR_MODELS)
def test_missing_gate_name(name):
    spec = spec_for(name)
    g = ones_gates(spec)
    gone = spec.names[1]
    del g[gone]
    with pytest.raises(ValueError, match=f"missing gate point '{gone}' \\({spec.channels[1]} channels\\)"):
        trace(name, images(name), g)


@pytest.mark.parametrize("name", ERROR_MODELS)
def test_wrong_channel_count(name):
    spec = spec_for(name)
    point, c = spec.names[-1], spec.channels[-1]
    for bad in (jnp.ones(c + 1), jnp.ones((BATCH, c - 1)), jnp.ones((BATCH + 1, c)), jnp.ones((1, 1, c))):
        g = ones_gates(spec)
        g[point] = bad
        with pytest.raises(ValueError) as e:
            trace(name, images(name), g)
        assert repr(point) in str(e.value) and str(tuple(bad.shape)) in str(e.value)
        assert f"wrong shape: {point!r}: got shape {tuple(bad.shape)}, expected ({c},) or" in str(e.value)


def test_gates_not_a_dict():
    with pytest.raises(TypeError, match="dict"):
        trace("resnet20", images("resnet20"), jnp.ones(688))


@pytest.mark.parametrize("name", ERROR_MODELS)
def test_wrong_input_rank_and_channels(name):
    model, v = create_model(name), variables_for(name)
    h, w, c = TEST_SHAPES[name]
    with pytest.raises(ValueError, match=r"NHWC"):
        model.apply(v, jnp.zeros((h, w, c)))  # missing batch axis
    with pytest.raises(ValueError, match=r"NHWC"):
        model.apply(v, jnp.zeros((1, 1, h, w, c)))
    with pytest.raises(ValueError, match=rf"\(B, H, W, {c}\)"):
        model.apply(v, jnp.zeros((1, h, w, c + 1)))
    if c == 3:  # NCHW by mistake
        with pytest.raises(ValueError, match="NHWC"):
            model.apply(v, jnp.zeros((1, c, h, w)))


@pytest.mark.parametrize("name", ERROR_MODELS)
def test_integer_input_rejected(name):
    model, v = create_model(name), variables_for(name)
    for dt in (jnp.uint8, jnp.int32):
        with pytest.raises(TypeError, match=r"floating-point images in \[0, 1\]"):
            model.apply(v, jnp.zeros((1, *TEST_SHAPES[name]), dt))


def test_vgg16_bn_cifar_rejects_other_sizes():
    """Its classifier takes 512x1x1 features: a 64 px image cannot fit the 32 px weights."""
    with pytest.raises(Exception):
        trace("vgg16_bn_cifar", jnp.zeros((1, 64, 64, 3)))


def test_train_mode_updates_batch_stats():
    model, v = create_model("resnet20"), variables_for("resnet20")
    out, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        v, images("resnet20"))
    assert out.shape == (BATCH, 10)
    before = np.asarray(v["batch_stats"]["bn1"]["mean"])
    after = np.asarray(upd["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(before, after)


# ---------------------------------------------------------------- the GatedModel

def gated(name, placement="post_act") -> GatedModel:
    """A GatedModel with the random variables of ``variables_for``."""
    meta = default_meta(name, gate_placement=placement, input_shape=TEST_SHAPES[name])
    return GatedModel(create_model(name, **meta.module_overrides()), variables_for(name), meta)


@pytest.mark.parametrize("name,placement", [("digits_cnn", "post_act"), ("digits_cnn", "conv"),
                                            ("resnet20", "post_act")])
def test_flat_cdrp_gate_tree_and_gate_function_agree(name, placement):
    """The three ways to pass gates give the same logits: a flat CDRP (shared or per sample),
    the gate tree it cuts into, and a function returning those gates at each point."""
    m = gated(name, placement)
    spec = m.spec
    assert spec == spec_for(name, placement)
    x = images(name, batch=3)
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.0, 2.0, (3, spec.size)).astype(np.float32)
    flat[flat < 0.3] = 0.0
    for g in (flat, flat[1]):                                   # (B, D) per sample, (D,) shared
        tree = spec.split(jnp.asarray(g))
        seen = []

        def fn(point, act, tree=tree, seen=seen):
            seen.append((point, act.shape[-1]))
            return tree[point]

        ref = np.asarray(m.logits(x, tree))
        np.testing.assert_array_equal(np.asarray(m.logits(x, jnp.asarray(g))), ref)
        np.testing.assert_array_equal(np.asarray(m.logits(x, g)), ref)           # numpy works as well
        np.testing.assert_array_equal(np.asarray(m.logits(x, fn)), ref)
        assert seen == list(spec)                   # called once per gate point, in forward order
        assert not np.allclose(ref, np.asarray(m.logits(x)))
    # None is the ungated network: all ones in every form
    ones = np.asarray(m.logits(x, jnp.ones(spec.size)))
    np.testing.assert_array_equal(np.asarray(m.logits(x)), ones)
    np.testing.assert_array_equal(np.asarray(m.logits(x, lambda p, a: jnp.ones(a.shape[-1]))), ones)


def test_gate_function_sees_the_arriving_activation():
    """A gate controller reads the activation at its point (before the gate) and returns a per-sample gate."""
    m = gated("digits_cnn")
    x = images("digits_cnn", batch=4)
    ungated = m.capture(x)
    arrived = {}

    def keep_strong(point, act):
        arrived[point] = act
        mean = jnp.mean(act, axis=(1, 2))                           # (B, C)
        return (mean >= jnp.median(mean, axis=-1, keepdims=True)).astype(act.dtype)

    cap = m.capture(x, keep_strong)
    first = m.spec.names[0]
    np.testing.assert_array_equal(np.asarray(arrived[first]), np.asarray(ungated.acts[first]))
    for n, c in m.spec:
        assert arrived[n].shape[-1] == c
        # after the gate, the channels below the median are silenced, per sample
        a = np.asarray(cap.acts[n]).reshape(4, -1, c)
        kept = np.asarray(keep_strong(n, arrived[n]))
        np.testing.assert_array_equal(a[kept[:, None, :].repeat(a.shape[1], 1) == 0], 0.0)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "vgg16_bn_cifar"])
def test_capture_returns_every_gate_point_in_order_and_the_features(name):
    m = gated(name)
    x = images(name)
    cap = m.capture(x)
    assert isinstance(cap, Capture)
    assert tuple(cap.acts) == m.spec.names                       # forward order (not jitted: no key sort)
    for (n, c), a in zip(m.spec, cap.acts.values()):
        assert a.shape[0] == BATCH and a.shape[-1] == c, n
    np.testing.assert_array_equal(np.asarray(cap.logits), np.asarray(m.logits(x)))
    # the penultimate features are the input of the last linear layer
    head = m.variables["params"]["linear" if "linear" in m.variables["params"] else "classifier_6"]
    close(np.asarray(cap.features) @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), cap.logits)
    # gated: the activations are those after the gates
    g = jnp.zeros(m.spec.size).at[: m.spec.channels[0]].set(1.0)
    gcap = m.capture(x, g)
    for n in m.spec.names[1:]:
        if m.gate_placement == "post_act":
            np.testing.assert_array_equal(np.asarray(gcap.acts[n]), 0.0)


def test_bad_gate_function_shape_is_an_error():
    m = gated("digits_cnn")
    x = images("digits_cnn")
    with pytest.raises(ValueError, match="the gate function returned gates that do not fit") as e:
        m.logits(x, lambda point, act: jnp.ones(act.shape[-1] + (point == "conv2")))
    msg = str(e.value)
    assert "'conv2': got shape (65,)" in msg and "conv1" not in msg.split("forward order")[0]
    with pytest.raises(ValueError, match="the gate function returned gates that do not fit"):
        m.logits(x, lambda point, act: jnp.ones((BATCH + 1, act.shape[-1])))   # another batch size
    with pytest.raises(ValueError, match="the gate function returned gates that do not fit"):
        jax.jit(lambda x: m.logits(x, lambda p, a: jnp.ones(a.shape[1:])))(x)  # (H, W, C): checked under jit too


def test_gate_argument_errors():
    m = gated("digits_cnn")
    x = images("digits_cnn")
    with pytest.raises(TypeError, match="gates must be None, a gate tree"):
        m.logits(x, [1.0] * m.spec.size)
    with pytest.raises(ValueError, match=r"flat CDRP must have shape \(224,\) or \(B, 224\)"):
        m.logits(x, jnp.ones((BATCH, 1, m.spec.size)))
    with pytest.raises(ValueError, match=r"223 entries.*224"):
        m.logits(x, jnp.ones(223))
    with pytest.raises(ValueError, match="missing gate point 'conv3' \\(128 channels\\)"):
        m.logits(x, {"conv1": jnp.ones(32), "conv2": jnp.ones(64)})
    with pytest.raises(ValueError, match=r"unexpected gate points \['conv4'\]"):
        m.logits(x, {**ones_gates(m.spec), "conv4": jnp.ones(3)})


def test_gated_model_is_a_pure_jittable_differentiable_function():
    m = gated("digits_cnn")
    x = images("digits_cnn")
    flat = jnp.full((BATCH, m.spec.size), 0.5)
    val, grad = jax.jit(jax.value_and_grad(lambda g: m.logits(x, g)[:, 0].sum()))(flat)
    close(val, m.logits(x, flat)[:, 0].sum())
    assert grad.shape == (BATCH, m.spec.size) and np.any(np.asarray(grad) != 0)
    per = jax.vmap(lambda xi, gi: m.logits(xi[None], gi)[0])(x, flat)     # vmap over samples and gates
    close(per, m.logits(x, flat))
    # hashable by identity: a valid static argument
    f = jax.jit(lambda model, x: model.logits(x), static_argnums=0)
    close(f(m, x), m.logits(x))
    assert hash(m) == hash(m) and m != gated("digits_cnn")


def test_gated_model_metadata_and_with_variables():
    m = gated("digits_cnn", "conv")
    assert (m.name, m.num_classes, m.input_shape, m.gate_placement) == ("digits_cnn", 10, (8, 8, 1), "conv")
    assert m.class_names == tuple("0123456789")
    v2 = jax.tree_util.tree_map(lambda a: a * 0.5, m.variables)
    m2 = m.with_variables(v2)
    assert m2.spec is m.spec and m2.meta == m.meta and m2.module is m.module and m2.variables is v2
    x = images("digits_cnn")
    assert not np.allclose(np.asarray(m2.logits(x)), np.asarray(m.logits(x)))
    close(m2.logits(x), m.module.apply(v2, x))
    # a spec given explicitly is kept; otherwise computed from the module
    assert GatedModel(m.module, m.variables, m.meta, spec=m.spec).spec is m.spec


def test_check_dataset_fits():
    from jaxroute.data import as_dataset
    from jaxroute.models.gated import check_dataset_fits

    m = gated("digits_cnn")
    check_dataset_fits(m, as_dataset(np.zeros((2, 8, 8, 1), np.float32), [0, 9]))
    with pytest.raises(ValueError, match=r"images of shape \(32, 32, 3\), model digits_cnn expects \(8, 8, 1\)"):
        check_dataset_fits(m, as_dataset(np.zeros((2, 32, 32, 3), np.float32), [0, 1]))
    with pytest.raises(ValueError, match="data has 12 classes, model outputs 10"):
        check_dataset_fits(m, as_dataset(np.zeros((2, 8, 8, 1), np.float32), [0, 11]))


def test_gate_spec_split_numpy_and_jax():
    spec = GateSpec(("a", "b", "c"), (2, 3, 4))
    flat = np.arange(2 * 9, dtype=np.float32).reshape(2, 9)
    parts = spec.split(flat)
    assert list(parts) == ["a", "b", "c"] and all(isinstance(v, np.ndarray) for v in parts.values())
    np.testing.assert_array_equal(parts["b"], flat[:, 2:5])
    jparts = spec.split(jnp.asarray(flat[0]))
    assert all(isinstance(v, jax.Array) for v in jparts.values())
    np.testing.assert_array_equal(np.asarray(jparts["c"]), flat[0, 5:])
    with pytest.raises(ValueError, match="8 entries.*9"):
        spec.split(flat[:, :8])
    with pytest.raises(ValueError, match="duplicate"):
        GateSpec(("a", "a"), (1, 1))
    with pytest.raises(ValueError, match="differ in length"):
        GateSpec(("a",), (1, 2))


def test_gate_modules_import_no_flax():
    """The numpy analyses use GateSpec without paying for (or needing) Flax."""
    code = ("import sys, jaxroute.models.gates, jaxroute.analysis, jaxroute.detection; "
            "from jaxroute.models import GateSpec, flatten_gates; "
            "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('flax'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
