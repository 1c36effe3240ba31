"""Weights: PyTorch import (parity with independent PyTorch references on real
images), orbax checkpoints, and clear errors for every kind of bad input.

Parity: for each converted architecture the jaxroute logits match the PyTorch
reference (``tests/torch_reference.py``) within 1e-4 max abs on real CIFAR-10
JPEG test images; so do the penultimate features, every conv/linear output
(the ``conv`` gate points) and, for the ResNets, every block output.  Without
../shared the pretrained and accuracy tests skip, and the random-weight parity
tests run on synthetic images instead.  ``pytest -s`` prints the differences.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.models import GatedModel, ModelMeta, create_model, default_meta, model_card
from jaxroute.weights import (
    CheckpointMismatchError, abstract_variables, load_model, load_torch_state_dict, read_meta,
    restore_variables, save_model, torch_to_flax,
)

LOGIT_TOL = 1e-4  # max abs difference of logits, jaxroute vs PyTorch

# Architecture -> image size used for the parity test (the CIFAR nets at their
# native 32 px; the ImageNet nets on upsampled CIFAR images, small for speed
# but large enough that every layer and adaptive pool does real work).
RANDOM_ARCHS = {"vgg16": 64, "vgg16_bn_cifar": 32, "alexnet": 112, "resnet18": 112, "resnet50": 64}
PRETRAINED_ARCHS = ("resnet20", "resnet32")
PARITY_BATCH = 8

# Filled by the parity tests, printed at the end of the module (pytest -s).
MAX_DIFFS: dict[str, dict[str, float]] = {}


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def ref():
    """The PyTorch reference models (skips without torch)."""
    pytest.importorskip("torch")
    import torch_reference

    return torch_reference


@pytest.fixture(scope="module", autouse=True)
def _report_diffs():
    yield
    if MAX_DIFFS:
        print("\nmax abs difference, jaxroute vs PyTorch:")
        for name, d in MAX_DIFFS.items():
            print(f"  {name:15s} " + "  ".join(f"{k} {v:.2e}" for k, v in d.items()))


@pytest.fixture(scope="module")
def parity_images(request):
    """Real CIFAR-10 test images (2 per class) when ../shared is present; else
    smooth synthetic images, so that the random-weight parity still runs."""
    from conftest import CIFAR10_JPEG_TEST

    if CIFAR10_JPEG_TEST.is_dir():
        return request.getfixturevalue("cifar10_sample")[0]
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    rng = np.random.default_rng(0)
    imgs = [np.stack([np.sin(np.pi * (a * xx + b * yy) + c) * 0.5 + 0.5 for a, b, c in rng.random((3, 3)) * 3], -1)
            for _ in range(20)]
    return np.round(np.stack(imgs) * 255).astype(np.float32) / 255.0


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a float [0, 1] NHWC batch that came from uint8 images."""
    from PIL import Image

    if x.shape[1] == size:
        return x
    u8 = np.round(x * 255).astype(np.uint8)
    out = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in u8]
    return np.stack(out).astype(np.float32) / 255.0


def random_state_dict_file(ref, name: str, path: Path, size: int, seed: int = 0):
    """A reference model with random weights and BN statistics, saved with torch.save."""
    import torch

    model = ref.randomize_(ref.build(name), seed=seed, calib_shape=(8, 3, size, size))
    torch.save(model.state_dict(), path)
    return model


def torch_outputs(model, x_nchw, module_names):
    """Logits, penultimate features (the input of the last linear layer) and the
    outputs of the named submodules, from one forward pass."""
    import torch

    acts, handles = {}, []
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    handles.append(head.register_forward_pre_hook(
        lambda _m, inp: acts.__setitem__("<features>", inp[0].detach().clone())))
    for n in module_names:
        def hook(_m, _inp, out, n=n):
            acts[n] = out.detach().clone()  # clone: an in-place ReLU may follow
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            logits = model(x_nchw)
    finally:
        for h in handles:
            h.remove()
    feats = acts.pop("<features>")
    return logits.numpy(), feats.numpy(), {k: v.numpy() for k, v in acts.items()}


def nchw(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def check_parity(ref, name: str, torch_model, loaded: GatedModel, x: np.ndarray):
    """Compare logits, features and intermediate activations of both implementations."""
    meta = loaded.meta
    xt = ref.normalize_nchw(x, meta.mean, meta.std)
    conv_meta = dataclasses.replace(meta, gate_placement="conv")
    conv_model = GatedModel(create_model(name, **conv_meta.module_overrides()), loaded.variables, conv_meta)
    xj = jnp.asarray(x)
    logits, acts, features = jax.jit(loaded.capture)(xj)
    _, acts_conv, _ = jax.jit(conv_model.capture)(xj)
    cap, cap_conv = {"gates": acts, "features": features}, {"gates": acts_conv}
    conv_points, post_points = list(cap_conv["gates"]), list(cap["gates"])
    # (jit returns the dicts with sorted keys; the spec holds the forward order)
    assert sorted(conv_points) == sorted(conv_model.spec.names) and sorted(post_points) == sorted(loaded.spec.names)
    # every "conv" gate point is named after the torch module that produces it;
    # "post_act" block outputs (ResNets) are torch modules too.
    modules = dict(torch_model.named_modules())
    assert all(p in modules for p in conv_points), [p for p in conv_points if p not in modules]
    blocks = [p for p in post_points if p in modules and p not in conv_points]
    if name.startswith("resnet"):
        assert blocks, "no block outputs to compare"
    t_logits, t_feats, t_acts = torch_outputs(torch_model, xt, conv_points + blocks)

    logit_diff = float(np.abs(np.asarray(logits) - t_logits).max())
    feat_diff = float(np.abs(np.asarray(cap["features"]) - t_feats).max())
    act_rel = max(
        [rel_err(nchw(cap_conv["gates"][p]), t_acts[p]) for p in conv_points]
        + [rel_err(nchw(cap["gates"][p]), t_acts[p]) for p in blocks]
    )
    MAX_DIFFS[name] = {"logits": logit_diff, "features": feat_diff, "acts(rel)": act_rel,
                       "|logits|": float(np.abs(t_logits).max())}
    assert logits.shape == t_logits.shape
    assert logit_diff < LOGIT_TOL, f"{name}: logits differ by {logit_diff:.3g}"
    assert feat_diff < LOGIT_TOL * max(1.0, float(np.abs(t_feats).max())), f"{name}: features differ"
    assert act_rel < 1e-5, f"{name}: intermediate activations differ (rel {act_rel:.3g})"
    # the prediction agrees too
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1), t_logits.argmax(-1))
    # nontrivial outputs (not all-equal logits)
    assert float(np.std(t_logits)) > 1e-2
    return logits


# ---------------------------------------------------------------- parity

@pytest.mark.parametrize("name", PRETRAINED_ARCHS)
def test_parity_pretrained_cifar_resnet(name, ref, cifar_resnet_ckpt, cifar10_sample):
    """The shared pretrained checkpoints (legacy pickle format, ``module.`` prefix)."""
    import torch

    path = cifar_resnet_ckpt(name)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    torch_model = ref.build(name)
    torch_model.load_state_dict(sd, strict=True)
    torch_model.eval()

    loaded = load_model(name, path)
    assert isinstance(loaded, GatedModel) and loaded.name == name
    assert loaded.meta.arch == name and loaded.meta.input_shape == (32, 32, 3)
    assert loaded.meta.mean == (0.485, 0.456, 0.406) and loaded.meta.std == (0.229, 0.224, 0.225)
    x, y = cifar10_sample
    logits = check_parity(ref, name, torch_model, loaded, x)
    # a sanity check that the weights are the trained ones: most of these are right
    assert (np.asarray(logits).argmax(-1) == y).mean() >= 0.6


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg16" else n
                                  for n in RANDOM_ARCHS])  # VGG-16 at 224 px: > 30 s on 2 cores
def test_parity_random_torch_weights(name, ref, tmp_path, parity_images):
    """Random weights and BN statistics in a torch.save file (zip format, with
    ``num_batches_tracked``), on real images upsampled for the ImageNet nets."""
    path = tmp_path / f"{name}.pth"
    torch_model = random_state_dict_file(ref, name, path, RANDOM_ARCHS[name], seed=len(name))
    loaded = load_model(name, path)
    x = resize(parity_images[::2][:PARITY_BATCH], RANDOM_ARCHS[name])
    check_parity(ref, name, torch_model, loaded, x)


def test_torch_to_flax_direct(ref):
    """``torch_to_flax`` on an in-memory state dict (torch tensors or numpy arrays)."""
    import torch

    torch_model = ref.randomize_(ref.build("resnet20"), seed=3)
    module = create_model("resnet20")
    target = abstract_variables(module, (32, 32, 3))
    sd = torch_model.state_dict()
    v1 = torch_to_flax({k: v.numpy() for k, v in sd.items()}, target)
    v2 = torch_to_flax(sd, target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v1, v2)
    np.testing.assert_array_equal(v1["params"]["conv1"]["kernel"],
                                  sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v1["params"]["linear"]["kernel"], sd["linear.weight"].numpy().T)
    np.testing.assert_array_equal(v1["params"]["layer2_0"]["bn1"]["scale"], sd["layer2.0.bn1.weight"].numpy())
    np.testing.assert_array_equal(v1["batch_stats"]["layer3_2"]["bn2"]["var"],
                                  sd["layer3.2.bn2.running_var"].numpy())
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    with torch.inference_mode():
        t = torch_model(ref.normalize_nchw(x, module.mean, module.std)).numpy()
    assert np.abs(np.asarray(module.apply(v1, jnp.asarray(x))) - t).max() < LOGIT_TOL


# ---------------------------------------------------------------- full test-set accuracy

def _accuracy(loaded: GatedModel, x_u8: np.ndarray, y: np.ndarray, batch: int = 500):
    @jax.jit
    def logits_fn(xb):
        return loaded.logits(xb.astype(jnp.float32) / 255.0)

    top1 = top5 = 0
    for i in range(0, len(x_u8), batch):
        lg = np.asarray(logits_fn(jnp.asarray(x_u8[i : i + batch])))
        yb = y[i : i + batch]
        top5_idx = np.argsort(-lg, axis=-1)[:, :5]
        top1 += int((top5_idx[:, 0] == yb).sum())
        top5 += int((top5_idx == yb[:, None]).any(-1).sum())
    return 100.0 * top1 / len(y), 100.0 * top5 / len(y)


def _check_accuracy(name, expected_top1, expected_top5, ckpt, data):
    pytest.importorskip("torch")
    x, y = data
    assert x.shape == (10000, 32, 32, 3) and np.bincount(y).tolist() == [1000] * 10
    loaded = load_model(name, ckpt)
    top1, top5 = _accuracy(loaded, x, y)
    print(f"\n{name}: top-1 {top1:.2f}%  top-5 {top5:.2f}% on the 10,000 JPEG test images")
    assert abs(top1 - expected_top1) <= 0.3, f"{name} top-1 {top1:.2f}%, expected {expected_top1} +- 0.3"
    assert abs(top5 - expected_top5) <= 0.3, f"{name} top-5 {top5:.2f}%, expected {expected_top5} +- 0.3"


def test_resnet20_accuracy_on_jpeg_test_set(cifar_resnet_ckpt, cifar10_test_jpeg):
    """README: resnet20 81.03% top-1, 98.72% top-5 on the 10k JPEG test set."""
    _check_accuracy("resnet20", 81.03, 98.72, cifar_resnet_ckpt("resnet20"), cifar10_test_jpeg)


@pytest.mark.slow  # the ResNet-20 accuracy test covers the same path in the default suite
def test_resnet32_accuracy_on_jpeg_test_set(cifar_resnet_ckpt, cifar10_test_jpeg):
    """README: resnet32 82.56% top-1, 99.00% top-5 on the 10k JPEG test set."""
    _check_accuracy("resnet32", 82.56, 99.00, cifar_resnet_ckpt("resnet32"), cifar10_test_jpeg)


# ---------------------------------------------------------------- orbax checkpoints

@pytest.fixture(scope="module")
def random_resnet20():
    """A ResNet-20 with random weights and BN statistics (no torch, no ../shared).

    Drawn with numpy: ``jax.random`` initializers take ~0.5 s each to compile
    on a small CPU, ~8 s for a ResNet-20."""
    module = create_model("resnet20")
    rng = np.random.default_rng(1)
    variables = jax.tree_util.tree_map(
        lambda s: (0.5 + rng.random(s.shape, dtype=np.float32)) / 4,
        abstract_variables(module, (32, 32, 3)))
    return GatedModel(module, variables, default_meta("resnet20", source="random"))


def test_random_init_by_key():
    a = load_model("digits_cnn", key=jax.random.key(0))
    assert isinstance(a, GatedModel)
    assert (a.name, a.num_classes, a.input_shape, a.gate_placement) == ("digits_cnn", 10, (8, 8, 1), "post_act")
    assert a.class_names == tuple("0123456789") and a.spec.names == ("conv1", "conv2", "conv3")
    assert a.meta.arch == "digits_cnn" and a.meta.source == "random-init"
    assert a.meta.input_shape == (8, 8, 1) and a.meta.mean == (0.5,)
    k = a.variables["params"]["conv1"]["kernel"]
    assert isinstance(k, np.ndarray) and k.shape == (3, 3, 1, 32) and np.std(k) > 0
    np.testing.assert_array_equal(a.variables["batch_stats"]["bn1"]["var"], 1.0)


def _logits(lm: GatedModel, x):
    return np.asarray(lm.module.apply(lm.variables, jnp.asarray(x)))


def test_checkpoint_round_trip(random_resnet20, tmp_path):
    lm = random_resnet20
    d = save_model(tmp_path / "ck", lm.variables, lm.meta)
    assert (d / "jaxroute.json").is_file() and (d / "variables").is_dir()
    assert read_meta(d) == lm.meta
    meta_json = json.loads((d / "jaxroute.json").read_text())
    assert meta_json["arch"] == "resnet20" and meta_json["format_version"] == 1

    back = load_model(None, d)
    assert isinstance(back, GatedModel) and back.meta == lm.meta
    assert create_model("resnet20") == back.module
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables, jax.device_get(lm.variables))
    x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(_logits(back, x), _logits(lm, x))
    # by name too, and the GatedModel calls work on the restored model
    back2 = load_model("resnet20", d)
    assert back2.spec.size == 688 and back2.spec == lm.spec
    np.testing.assert_array_equal(np.asarray(back2.logits(jnp.asarray(x))), _logits(lm, x))
    np.testing.assert_array_equal(np.asarray(back2.capture(jnp.asarray(x)).logits), _logits(lm, x))
    # restore_variables with and without an expected tree
    raw = restore_variables(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, raw, back.variables)


def test_checkpoint_round_trip_pretrained(cifar_resnet_ckpt, cifar10_sample, tmp_path):
    """Convert the real checkpoint once, then load it without torch: identical logits."""
    pytest.importorskip("torch")
    lm = load_model("resnet20", cifar_resnet_ckpt("resnet20"))
    d = save_model(tmp_path / "r20", lm.variables, lm.meta)
    back = load_model("resnet20", d)
    assert back.meta == lm.meta and back.meta.source.endswith("resnet20-12fca82f.th")
    assert back.meta.class_names == model_card("resnet20").class_names
    x = cifar10_sample[0]
    np.testing.assert_array_equal(_logits(back, x), _logits(lm, x))


def test_checkpoint_metadata_drives_the_module(random_resnet20, tmp_path):
    """Saved module fields (normalization, placement, classes) come back; overrides apply."""
    lm = random_resnet20
    meta = ModelMeta(arch="resnet20", input_shape=(32, 32, 3), num_classes=10,
                     mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), gate_placement="conv",
                     class_names=tuple("abcdefghij"), source="test")
    d = save_model(tmp_path / "ck", lm.variables, meta)
    back = load_model(None, d)
    assert back.meta == meta
    assert (tuple(back.module.mean), tuple(back.module.std), back.module.gate_placement) == \
        ((0.5,) * 3, (0.2,) * 3, "conv")
    assert back.gate_placement == "conv" and back.class_names == tuple("abcdefghij")
    assert back.spec.names[2] == "layer1.0.conv2"
    over = load_model(None, d, gate_placement="post_act")
    assert over.module.gate_placement == "post_act" and over.spec.names[2] == "layer1.0"
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(_logits(over, x), _logits(back, x), atol=1e-6)


def test_default_meta_follows_the_model_card():
    m = default_meta("resnet20", source="x")
    card = model_card("resnet20")
    assert (m.arch, m.input_shape, m.num_classes, m.mean, m.std, m.class_names, m.source) == \
        ("resnet20", card.input_shape, 10, tuple(card.mean), tuple(card.std), card.class_names, "x")
    assert m.gate_placement == "post_act"
    # another class count drops the card's class names; lists become tuples; None keeps the card's value
    m7 = default_meta("resnet20", num_classes=7, mean=[0.5, 0.5, 0.5], std=None)
    assert m7.num_classes == 7 and m7.class_names is None and m7.mean == (0.5,) * 3 and m7.std == m.std
    assert ModelMeta.from_json(json.loads(json.dumps(m.to_json()))) == m
    lm = load_model("resnet20", key=jax.random.key(0), num_classes=7, gate_placement="conv")
    assert lm.num_classes == 7 and lm.gate_placement == "conv" and lm.class_names is None
    assert lm.spec.names[2] == "layer1.0.conv2"


def test_save_refuses_to_overwrite(random_resnet20, tmp_path):
    lm = random_resnet20
    d = save_model(tmp_path / "ck", lm.variables, lm.meta)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_model(d, lm.variables, lm.meta)
    save_model(d, lm.variables, lm.meta, overwrite=True)
    assert read_meta(d) == lm.meta


def test_restore_into_wrong_architecture_by_name(random_resnet20, tmp_path):
    d = save_model(tmp_path / "r20", random_resnet20.variables, random_resnet20.meta)
    with pytest.raises(ValueError, match=r"holds a 'resnet20' model, not 'resnet32'"):
        load_model("resnet32", d)


def test_restore_with_tampered_metadata(random_resnet20, tmp_path):
    """jaxroute.json says resnet32 but the variables are a resnet20: a mismatch error
    naming the missing tensors, not a crash deep inside orbax or the forward pass."""
    d = save_model(tmp_path / "r20", random_resnet20.variables, random_resnet20.meta)
    meta = json.loads((d / "jaxroute.json").read_text())
    meta["arch"] = "resnet32"
    (d / "jaxroute.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match=r"missing \(60\):.*layer1_3/"):
        load_model(None, d)


def test_restore_into_wrong_expected_tree(random_resnet20, tmp_path):
    d = save_model(tmp_path / "r20", random_resnet20.variables, random_resnet20.meta)
    expected = abstract_variables(create_model("resnet20", num_classes=100), (32, 32, 3))
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape.*linear/kernel"):
        restore_variables(d, expected)


def test_checkpoint_dir_without_metadata(random_resnet20, tmp_path):
    d = save_model(tmp_path / "ck", random_resnet20.variables, random_resnet20.meta)
    (d / "jaxroute.json").unlink()
    for name in ("resnet20", None):
        with pytest.raises(ValueError, match=r"not a complete jaxroute checkpoint \(no jaxroute\.json"):
            load_model(name, d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="jaxroute.json"):
        load_model("resnet20", empty)
    with pytest.raises(ValueError, match="jaxroute.json"):
        read_meta(empty)


def test_checkpoint_with_corrupt_metadata(random_resnet20, tmp_path):
    d = save_model(tmp_path / "ck", random_resnet20.variables, random_resnet20.meta)
    (d / "jaxroute.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint metadata"):
        load_model(None, d)
    (d / "jaxroute.json").write_text(json.dumps({"arch": "resnet999", "input_shape": [32, 32, 3],
                                                  "num_classes": 10, "mean": [0, 0, 0], "std": [1, 1, 1]}))
    with pytest.raises(ValueError, match="unknown model 'resnet999'"):
        load_model(None, d)


def test_checkpoint_without_variables(random_resnet20, tmp_path):
    d = save_model(tmp_path / "ck", random_resnet20.variables, random_resnet20.meta)
    shutil.rmtree(d / "variables")
    with pytest.raises(ValueError, match="could not restore variables"):
        load_model(None, d)


def test_read_meta_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_meta(tmp_path / "nope")


# ---------------------------------------------------------------- bad PyTorch files

def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.th"):
        load_model("resnet20", tmp_path / "nope.th")
    with pytest.raises(FileNotFoundError, match="nope.th"):
        load_torch_state_dict(tmp_path / "nope.th")


def test_unknown_weights_format(tmp_path):
    p = tmp_path / "weights.xyz"
    p.write_bytes(b"hello")
    with pytest.raises(ValueError, match="do not know how to read"):
        load_model("resnet20", p)


def test_load_model_needs_name_or_key(tmp_path):
    with pytest.raises(ValueError, match="model name is needed"):
        load_model(None, None)
    with pytest.raises(ValueError, match="PRNG key"):
        load_model("resnet20")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("resnet21", key=jax.random.key(0))


@pytest.mark.parametrize("content", [b"\x00garbage\xff" * 100, b"", b"PK\x03\x04 not really a zip"])
def test_corrupt_torch_file(tmp_path, content):
    pytest.importorskip("torch")
    p = tmp_path / "corrupt.th"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=r"corrupt\.th is not a PyTorch checkpoint of tensors") as e:
        load_model("resnet20", p)
    assert "weights_only=False" not in str(e.value)       # never advises unpickling an untrusted file


def test_torch_file_without_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(ValueError, match="not a state dict"):
        load_torch_state_dict(p)
    p2 = tmp_path / "notensors.pt"
    torch.save({"epoch": 3, "best_prec1": 91.0}, p2)
    with pytest.raises(ValueError, match="no tensors"):
        load_model("resnet20", p2)


@pytest.fixture(scope="module")
def resnet20_sd(ref):
    """A random ResNet-20 state dict in the upstream layout (DataParallel ``module.`` prefix,
    wrapped in {"state_dict": ...} like the shared checkpoints)."""
    model = ref.randomize_(ref.build("resnet20"), seed=11)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save_sd(tmp_path, sd, name="ck.th", prefix="module."):
    import torch

    p = tmp_path / name
    torch.save({"state_dict": {prefix + k: v for k, v in sd.items()}, "best_prec1": 0.0}, p)
    return p


def test_wrapped_state_dict_loads(resnet20_sd, tmp_path, ref):
    lm = load_model("resnet20", _save_sd(tmp_path, resnet20_sd))
    sd = load_torch_state_dict(_save_sd(tmp_path, resnet20_sd, "plain.th", prefix=""))
    assert set(sd) == set(resnet20_sd)
    np.testing.assert_array_equal(lm.variables["params"]["linear"]["bias"], resnet20_sd["linear.bias"].numpy())


def test_state_dict_of_other_depth(resnet20_sd, tmp_path, ref):
    """A resnet20 file loaded as resnet32 (and the reverse) names the differences."""
    with pytest.raises(CheckpointMismatchError) as e:
        load_model("resnet32", _save_sd(tmp_path, resnet20_sd))
    msg = str(e.value)
    assert "missing (60)" in msg and "layer1_3/bn1/mean (16,)" in msg
    assert "unexpected" not in msg and "wrong shape" not in msg

    sd32 = ref.randomize_(ref.build("resnet32"), seed=1).state_dict()
    with pytest.raises(CheckpointMismatchError) as e:
        load_model("resnet20", _save_sd(tmp_path, sd32, "r32.th"))
    msg = str(e.value)
    assert "unexpected" in msg and "layer1.3.conv1.weight (16, 16, 3, 3)" in msg
    assert "missing" not in msg


def test_state_dict_with_renamed_tensor(resnet20_sd, tmp_path):
    sd = dict(resnet20_sd)
    sd["fc.weight"] = sd.pop("linear.weight")
    with pytest.raises(CheckpointMismatchError) as e:
        load_model("resnet20", _save_sd(tmp_path, sd))
    msg = str(e.value)
    assert "missing (1): params/linear/kernel (64, 10)" in msg
    assert "unexpected (1): fc.weight (10, 64)" in msg


def test_state_dict_with_missing_tensor(resnet20_sd, tmp_path):
    sd = dict(resnet20_sd)
    del sd["layer2.1.bn2.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): batch_stats/layer2_1/bn2/var \(32,\)"):
        load_model("resnet20", _save_sd(tmp_path, sd))


def test_state_dict_with_misshaped_tensor(resnet20_sd, tmp_path):
    import torch

    sd = dict(resnet20_sd)
    sd["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    sd["layer3.0.bn1.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_model("resnet20", _save_sd(tmp_path, sd))
    msg = str(e.value)
    assert "wrong shape (2)" in msg
    assert "conv1.weight: checkpoint (16, 3, 5, 5)" in msg and "model expects (3, 3, 3, 16)" in msg
    assert "layer3.0.bn1.bias: checkpoint (32,)" in msg and "model expects (64,)" in msg
    # a mis-shaped tensor is reported once, as mis-shaped, not also as missing
    assert "missing" not in msg


def test_half_precision_state_dict(resnet20_sd, tmp_path):
    """fp16/bf16 checkpoints load (as float32)."""
    import torch

    for dt in (torch.float16, torch.bfloat16):
        sd = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in resnet20_sd.items()}
        lm = load_model("resnet20", _save_sd(tmp_path, sd, f"{dt}.th"))
        k = lm.variables["params"]["conv1"]["kernel"]
        assert k.dtype == np.float32
        np.testing.assert_array_equal(k, sd["conv1.weight"].float().numpy().transpose(2, 3, 1, 0))


def test_mismatch_error_is_a_value_error():
    assert issubclass(CheckpointMismatchError, ValueError)
