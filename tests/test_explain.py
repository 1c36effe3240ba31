"""Saliency methods against Captum 0.9.0 on an independent PyTorch ResNet-20, full and gated.

The PyTorch reference (``torch_reference.GatedReluResNet20``) has one non-in-place ``nn.ReLU`` module per use
(the residual ReLUs included), so Captum's ``Deconvolution`` and
``GuidedBackprop`` hooks reach every ReLU, and a gate module at every
``post_act`` gate point, fed per-sample flat gates through Captum's
``additional_forward_args`` (which Captum expands with the inputs for IG and
SmoothGrad).  It runs in float64; jaxroute in float32.  Every method, with
full weights and with per-sample gates, must agree within
max |diff| <= 1e-4 * max |map| (attributions and maps); SmoothGrad on the same
noise (Captum's noise draw is replaced by jaxroute's); Grad-CAM on the 8x8
map and after upsampling.  Default suite: random weights (converted from the
PyTorch model), synthetic images; the pretrained version on 100 real test
images is ``slow`` and needs ``../shared``.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.explain import (
    GradCAMConfig, IGConfig, SmoothGradConfig, explain, explanation_outputs, grad_cam_layer, grad_cam_map,
    integrated_gradients, class_gates, smoothgrad_noise,
)
from jaxroute.models import GatedModel, create_model, default_meta

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")
import torch_reference  # noqa: E402  (needs torch)

REL_TOL = 1e-4  # max |diff| <= REL_TOL * max |map|


@pytest.fixture(scope="module")
def pair():
    """(jaxroute GatedModel, float64 PyTorch model) with the same random weights and BN statistics."""
    from jaxroute.weights import abstract_variables, torch_to_flax

    module = create_model("resnet20")
    meta = default_meta("resnet20", source="test")
    spec = GatedModel(module, abstract_variables(module, (32, 32, 3)), meta).spec
    tm = torch_reference.GatedReluResNet20(spec.names, spec.channels)
    torch_reference.randomize_(tm, seed=5, calib_shape=(8, 3, 32, 32))
    sd = tm.state_dict()
    variables = torch_to_flax(sd, abstract_variables(module, (32, 32, 3)))
    return GatedModel(module, variables, meta), tm.double().eval()


@pytest.fixture(scope="module")
def images():
    """Smooth synthetic images (B=2) with some texture, and arbitrary targets."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    x = np.stack([np.stack([np.sin(np.pi * (a * xx + b * yy) + c) * 0.4 + 0.5 for a, b, c in rng.random((3, 3)) * 3], -1)
                  for _ in range(2)]).astype(np.float32)
    x = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    return x, np.array([3, 7], np.int32)


@pytest.fixture(scope="module")
def gates(pair, images):
    """Per-sample gates (B, D): one random 'subnetwork' per class, indexed by the target."""
    model, _ = pair
    rng = np.random.default_rng(1)
    per_class = (rng.random((10, model.spec.size)) < 0.7) * rng.uniform(0.5, 1.5, (10, model.spec.size))
    return per_class.astype(np.float32)[images[1]]


def nchw(x):
    return torch.as_tensor(np.ascontiguousarray(np.asarray(x, np.float64).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def captum_attributions(tm, method, x, target, gates, noise=None, steps=50):
    """Captum's attributions (B, H, W, C) of ``method`` on the float64 PyTorch model."""
    xt = nchw(x).requires_grad_(True)
    tt = torch.as_tensor(np.asarray(target, np.int64))
    args = (None if gates is None else torch.as_tensor(np.asarray(gates, np.float64)),)
    if method == "gradient":
        a = captum_attr.Saliency(tm).attribute(xt, target=tt, abs=False, additional_forward_args=args)
    elif method == "deconvnet":
        a = captum_attr.Deconvolution(tm).attribute(xt, target=tt, additional_forward_args=args)
    elif method == "guided_backprop":
        a = captum_attr.GuidedBackprop(tm).attribute(xt, target=tt, additional_forward_args=args)
    elif method == "integrated_gradients":
        a = captum_attr.IntegratedGradients(tm).attribute(xt, target=tt, n_steps=steps, additional_forward_args=args)
    elif method == "smoothgrad":
        n = noise.shape[1]
        flat = nchw(np.asarray(noise).reshape(-1, *noise.shape[2:]))  # sample-major, as repeat_interleave

        def add_noise(inp, stdev, partition):
            assert partition == n
            return inp.repeat_interleave(partition, dim=0) + flat

        nt = captum_attr.NoiseTunnel(captum_attr.Saliency(tm))
        orig = captum_attr.NoiseTunnel._add_noise_to_input
        captum_attr.NoiseTunnel._add_noise_to_input = staticmethod(add_noise)
        try:
            a = nt.attribute(xt, nt_type="smoothgrad", nt_samples=n, stdevs=0.15, target=tt, abs=False,
                             additional_forward_args=args)
        finally:
            captum_attr.NoiseTunnel._add_noise_to_input = orig
    elif method == "grad_cam":
        cam = captum_attr.LayerGradCam(tm, tm.layer3[2].gate_out).attribute(
            xt, target=tt, relu_attributions=True, additional_forward_args=args)
        up = captum_attr.LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")
        return cam[:, 0].detach().numpy(), up[:, 0].detach().numpy()
    else:
        raise AssertionError(method)
    return nhwc(a)


def assert_close(got, want, scale, what):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert err <= REL_TOL * scale, f"{what}: max |diff| {err:.3g} > {REL_TOL} * {scale:.3g}"


# ----------------------------------------------------------------------------- parity with Captum
def float64(model):
    """``model`` with float64 variables (use inside ``jax.enable_x64(True)``)."""
    return model.with_variables(jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), model.variables))


# Reduced step/sample counts keep the default suite fast; Captum gets the same counts.
SMALL = {"integrated_gradients": IGConfig(steps=8), "smoothgrad": SmoothGradConfig(samples=4)}


@pytest.mark.parametrize("gated", [False, True], ids=["full", "gated"])
@pytest.mark.parametrize("method", ["gradient", "deconvnet", "guided_backprop", "integrated_gradients",
                                    "smoothgrad"])
def test_pixel_methods_equal_captum(pair, images, gates, method, gated):
    """In float64 on both sides: in float32 a ReLU whose pre-activation lies within rounding of zero
    can switch between the two libraries and change that path point's gradient (seen on one of 50
    IG path points, 10 % of its gradient), which says nothing about the method."""
    model, tm = pair
    x, target = images
    g = gates if gated else None
    config = SMALL.get(method)
    with jax.enable_x64(True):
        key = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(len(x)))
        x64 = jnp.asarray(x, jnp.float64)
        noise = np.asarray(smoothgrad_noise(key, x64, config)) if method == "smoothgrad" else None
        ex = explain(float64(model), None if g is None else jnp.asarray(g, jnp.float64), x64, jnp.asarray(target),
                     method=method, config=config, key=key)
        got, got_map = np.asarray(ex.attributions), np.asarray(ex.maps)
    want = captum_attributions(tm, method, x, target, g, noise, steps=8)
    want_map = np.abs(want).max(-1)
    scale = float(want_map.max())
    assert scale > 0
    assert_close(got, want, scale, f"{method} attributions")
    assert_close(got_map, want_map, scale, f"{method} maps")


@pytest.mark.parametrize("gated", [False, True], ids=["full", "gated"])
def test_grad_cam_equals_captum(pair, images, gates, gated):
    model, tm = pair
    x, target = images
    g = gates if gated else None
    assert grad_cam_layer(model) == "layer3.2"
    with jax.enable_x64(True):
        m64, x64 = float64(model), jnp.asarray(x, jnp.float64)
        gj = None if g is None else jnp.asarray(g, jnp.float64)
        cam = np.asarray(grad_cam_map(m64, gj, x64, jnp.asarray(target), layer="layer3.2"))
        ex = explain(m64, gj, x64, jnp.asarray(target), method="grad_cam")
        maps, attr_shape = np.asarray(ex.maps), ex.attributions.shape
    want_cam, want_up = captum_attributions(tm, "grad_cam", x, target, g)
    assert cam.shape == (2, 8, 8) and maps.shape == (2, 32, 32) and attr_shape == (2, 32, 32, 3)
    scale = float(want_cam.max())
    assert scale > 0
    assert_close(cam, want_cam, scale, "Grad-CAM 8x8")
    assert_close(maps, want_up, scale, "Grad-CAM upsampled")


def test_relu_rule_reaches_the_residual_relus(pair, images):
    """Guided backprop differs from the gradient only through the ReLU rule, residual ReLUs included:
    with the rule on the non-residual ReLUs alone it would not match Captum (checked above); here,
    the rule leaves the forward pass unchanged."""
    model, _ = pair
    x = jnp.asarray(images[0])
    for rule in ("deconvnet", "guided"):
        m = model.with_relu_rule(rule)
        assert m.relu_rule == rule and m.spec == model.spec
        np.testing.assert_array_equal(np.asarray(m.logits(x)), np.asarray(model.logits(x)))
    assert model.with_relu_rule("plain") is model
    with pytest.raises(ValueError, match="relu rule"):
        model.with_relu_rule("leaky")


# ----------------------------------------------------------------------------- properties
def test_integrated_gradients_completeness(pair, images):
    """sum(attributions) = logit(x) - logit(black) within 1 % at 300 steps (Sundararajan et al., Prop. 1)."""
    model, _ = pair
    x, target = jnp.asarray(images[0][:1]), jnp.asarray(images[1][:1])
    ex = integrated_gradients(model, None, x, target, config=IGConfig(steps=300))
    lg = lambda z: np.asarray(model.logits(z))[:, images[1][0]]  # noqa: E731
    delta = lg(x) - lg(jnp.zeros_like(x))
    total = np.asarray(ex.attributions).sum(axis=(1, 2, 3))
    assert np.all(np.abs(total - delta) <= 0.01 * np.abs(delta)), (total, delta)


@pytest.mark.parametrize("method", [pytest.param("smoothgrad", marks=pytest.mark.slow), "grad_cam"])
def test_one_image_alone_equals_it_in_a_batch(pair, images, method):
    """Jitted, per-sample class gates and per-sample SmoothGrad keys: image 1 alone = image 1 in the batch
    (the other methods share these code paths: the vmapped points, the gate shift)."""
    model, _ = pair
    x, target = images
    subnets = (np.random.default_rng(6).random((10, model.spec.size)) < 0.7).astype(np.float32)
    small = {"smoothgrad": SmoothGradConfig(samples=4)}.get(method)
    fn = explanation_outputs(model, method, small, subnets=subnets, target="label",
                             key=jax.random.key(3) if method == "smoothgrad" else None)
    batch = fn(jnp.asarray(x), jnp.asarray(target), jnp.arange(2))
    alone = fn(jnp.asarray(x[1:2]), jnp.asarray(target[1:2]), jnp.arange(1, 2))
    scale = float(np.abs(batch["maps"][1]).max())
    np.testing.assert_allclose(alone["attributions"][0], batch["attributions"][1], atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(alone["maps"][0], batch["maps"][1], atol=1e-5 * scale, rtol=0)


def test_subnets_select_each_images_class(pair, images, gates):
    """``subnets[target]`` per image in one batch = each image explained alone under its class's gates."""
    model, _ = pair
    x, target = jnp.asarray(images[0]), images[1]
    rng = np.random.default_rng(2)
    subnets = (rng.random((10, model.spec.size)) < 0.6).astype(np.float32)
    fn = explanation_outputs(model, "gradient", subnets=subnets)
    out = fn(x, jnp.asarray(target), jnp.arange(2))
    for i in (1,):
        ex = explain(model, jnp.asarray(subnets[target[i]]), x[i:i + 1], jnp.asarray(target[i:i + 1]),
                     method="gradient")
        np.testing.assert_allclose(out["attributions"][i], ex.attributions[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out["target"], target)


# ----------------------------------------------------------------------------- errors
def test_bad_configs_and_inputs(pair, images):
    model, _ = pair
    x = jnp.asarray(images[0])
    with pytest.raises(ValueError, match="IG steps"):
        IGConfig(steps=0)
    with pytest.raises(ValueError, match="IG rule"):
        IGConfig(rule="simpson")
    with pytest.raises(ValueError, match="SmoothGrad sigma"):
        SmoothGradConfig(sigma=float("nan"))
    with pytest.raises(ValueError, match="Grad-CAM upsample"):
        GradCAMConfig(upsample="nearest")
    with pytest.raises(ValueError, match="unknown saliency method"):
        explain(model, None, x, jnp.zeros(2, jnp.int32), method="lime")
    with pytest.raises(TypeError, match="IGConfig"):
        explain(model, None, x, jnp.zeros(2, jnp.int32), method="integrated_gradients", config=SmoothGradConfig())
    with pytest.raises(ValueError, match="PRNG key"):
        explain(model, None, x, jnp.zeros(2, jnp.int32), method="smoothgrad")
    with pytest.raises(ValueError, match="target must be"):
        explain(model, None, x, jnp.zeros(3, jnp.int32), method="gradient")
    with pytest.raises(ValueError, match="not a spatial gate point"):
        explain(model, None, x, jnp.zeros(2, jnp.int32), method="grad_cam", config=GradCAMConfig(layer="fc"))


def save_subnets(path, gates, classes=None):
    """A subnets.npz as ``jaxroute subnet`` writes it (one snapshot), with the given gates."""
    from jaxroute.routing.subnet import Subnets

    k, d = gates.shape
    classes = np.arange(k) if classes is None else np.asarray(classes)
    s = Subnets(gates=gates, sparsity=np.mean(gates > 0, 1), selected_epoch=np.ones(k, int),
                fallback=np.zeros(k, bool), classes=classes, snapshot_gates=gates[None],
                snapshot_loss=np.zeros((1, k)), snapshot_sparsity=np.mean(gates > 0, 1)[None],
                train_loss=np.zeros((1, k)))
    np.savez(path / "subnets.npz", **s._asdict())


def test_class_gates_checks_the_model(pair, tmp_path):
    model, _ = pair
    g = np.random.default_rng(0).random((10, model.spec.size)).astype(np.float32)
    save_subnets(tmp_path, g[::-1].copy(), classes=np.arange(10)[::-1])
    np.testing.assert_array_equal(class_gates(tmp_path, model), g)  # row c = class c
    save_subnets(tmp_path, np.ones((10, 7), np.float32))
    with pytest.raises(ValueError, match="has 688 gates|gates per subnetwork"):
        class_gates(tmp_path, model)
    save_subnets(tmp_path, np.ones((3, model.spec.size), np.float32))
    with pytest.raises(ValueError, match="no subnetwork for classes"):
        class_gates(tmp_path, model)
    with pytest.raises(FileNotFoundError):
        class_gates(tmp_path / "nothing", model)


# ----------------------------------------------------------------------------- command line
def test_cli_explain_digits(tmp_path, capsys):
    """`jaxroute explain` on the digits CNN (random weights), full and under class subnetworks."""
    from jaxroute.cli.main import main

    base = ["explain", "--model", "digits_cnn", "--data", "digits", "--split",
            "test", "--limit", "12", "--batch-size", "6", "--shard-size", "6", "--no-progress", "--json"]
    assert main(base + ["--method", "gradient", "--out", str(tmp_path / "full")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 12 and res["methods"] == ["gradient"] and set(res["maps_per_s"]) == {"gradient"}
    z = np.load(tmp_path / "full" / "gradient" / "test.npz")
    assert z["attributions"].shape == (12, 8, 8, 1) and z["maps"].shape == (12, 8, 8)
    assert z["attributions"].dtype == np.float32
    np.testing.assert_array_equal(z["target"], z["label"])
    d = 32 + 64 + 128
    save_subnets(tmp_path, np.ones((10, d), np.float32))
    assert main(base + ["--method", "gradient", "--subnets", str(tmp_path), "--out", str(tmp_path / "sub")]) == 0
    capsys.readouterr()
    # all-ones subnetworks = the full model
    np.testing.assert_allclose(np.load(tmp_path / "sub" / "gradient" / "test.npz")["attributions"],
                               z["attributions"], rtol=1e-6, atol=1e-7)
    # bad input: one line, exit 2
    save_subnets(tmp_path, np.ones((10, d + 1), np.float32))
    assert main(base + ["--method", "gradient", "--subnets", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "gates per subnetwork" in capsys.readouterr().err
    assert main(base + ["--method", "gradient,lime", "--out", str(tmp_path / "y")]) == 2
    assert "unknown saliency method" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pretrained, real images
@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True], ids=["full", "gated"])
def test_pretrained_resnet20_equals_captum_on_100_images(cifar_resnet_ckpt, cifar10_interleaved, gated):
    """The acceptance check: the shared pretrained ResNet-20, 100 real test images, every method."""
    from jaxroute.weights import load_model, load_torch_state_dict

    model = load_model("resnet20", cifar_resnet_ckpt("resnet20"))
    tm = torch_reference.GatedReluResNet20(model.spec.names, model.spec.channels)
    sd = {k: torch.as_tensor(v) for k, v in load_torch_state_dict(cifar_resnet_ckpt("resnet20")).items()}
    tm.load_state_dict(sd, strict=True)
    tm = tm.double().eval()
    x, y = cifar10_interleaved(10)
    rng = np.random.default_rng(4)
    g = ((rng.random((10, model.spec.size)) < 0.7).astype(np.float32)[y] if gated else None)
    gj = None if g is None else jnp.asarray(g)
    for method in ("gradient", "deconvnet", "guided_backprop", "integrated_gradients", "smoothgrad", "grad_cam"):
        for lo in range(0, 100, 25):
            sl = slice(lo, lo + 25)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(lo, lo + 25))
            noise = np.asarray(smoothgrad_noise(keys, jnp.asarray(x[sl]))) if method == "smoothgrad" else None
            ex = explain(model, None if gj is None else gj[sl], jnp.asarray(x[sl]), jnp.asarray(y[sl]),
                         method=method, key=keys)
            gs = None if g is None else g[sl]
            if method == "grad_cam":
                want_cam, want_up = captum_attributions(tm, method, x[sl], y[sl], gs)
                cam = grad_cam_map(model, None if gj is None else gj[sl], jnp.asarray(x[sl]), jnp.asarray(y[sl]),
                                   layer="layer3.2")
                assert_close(cam, want_cam, float(want_cam.max()), "Grad-CAM 8x8")
                assert_close(ex.maps, want_up, float(want_cam.max()), "Grad-CAM upsampled")
                continue
            want = captum_attributions(tm, method, x[sl], y[sl], gs, noise)
            scale = float(np.abs(want).max())
            assert_close(ex.attributions, want, scale, f"{method} attributions")
            assert_close(ex.maps, np.abs(want).max(-1), scale, f"{method} maps")


@pytest.mark.slow
def test_one_image_alone_equals_it_in_a_batch_of_256(pair):
    model, _ = pair
    x = jax.random.uniform(jax.random.key(5), (256, 32, 32, 3))
    t = jnp.arange(256, dtype=jnp.int32) % 10
    for method in ("guided_backprop", "smoothgrad"):
        small = SmoothGradConfig(samples=4) if method == "smoothgrad" else None
        fn = explanation_outputs(model, method, small, key=jax.random.key(1) if method == "smoothgrad" else None)
        batch = fn(x, t, jnp.arange(256))
        alone = fn(x[77:78], t[77:78], jnp.arange(77, 78))
        scale = float(np.abs(batch["maps"][77]).max())
        np.testing.assert_allclose(alone["attributions"][0], batch["attributions"][77], atol=1e-5 * scale, rtol=0)
