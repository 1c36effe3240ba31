"""DGR engine, AWR/AAR baselines, ablation and metrics on the pretrained ResNet-20."""
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from jaxroute.models import flatten_gates, unflatten_gates
from jaxroute.routing import (
    DGRConfig, ablation_curve, ablation_mask, dgr_route, prune_route, routing_metrics, weight_l1_scores,
)
from jaxroute.routing.job import make_router, route_array

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CKPT = SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"
pytestmark = pytest.mark.skipif(not CKPT.exists(), reason=f"needs ../shared (pretrained ResNet-20 at {CKPT})")


@pytest.fixture(scope="module")
def resnet20():
    from jaxroute.weights import load_model

    pytest.importorskip("torch")
    return load_model("resnet20", CKPT)


@pytest.fixture(scope="module")
def images():
    root = SHARED / "data/cifar10-jpeg/test"
    classes = sorted(p.name for p in root.iterdir())
    xs, ys = [], []
    for c, cl in enumerate(classes):
        for f in sorted((root / cl).glob("*.jpg"))[:2]:
            xs.append(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255)
            ys.append(c)
    return np.stack(xs), np.array(ys)


def reference_dgr(logits_fn, spec, x1, cfg: DGRConfig):
    """Algorithm 1 written out for ONE image, the plain way: a Python loop, a
    fresh optimizer, a full forward/backward at every step (no shortcuts)."""
    d = spec.size
    fwd = jax.jit(lambda g: logits_fn(unflatten_gates(spec, g[None]), x1[None])[0])
    full = fwd(jnp.ones(d))
    p = jax.nn.softmax(full)
    pred = int(jnp.argmax(full))

    def loss_ce(g):
        return -jnp.sum(p * jax.nn.log_softmax(fwd(g)))

    vg = jax.jit(jax.value_and_grad(loss_ce))
    opt = optax.sgd(cfg.lr, momentum=cfg.momentum)
    g = jnp.ones(d)
    state = opt.init(g)
    best, best_loss = None, np.inf
    for t in range(cfg.steps + 1):
        ce, grad = vg(g)
        loss = float(ce + cfg.gamma * jnp.sum(jnp.abs(g)))
        if t >= 1 and int(jnp.argmax(fwd(g))) == pred and loss < best_loss:
            best, best_loss = g, loss
        if t == cfg.steps:
            break
        upd, state = opt.update(grad + cfg.gamma * jnp.sign(g), state, g)
        g = jnp.clip(optax.apply_updates(g, upd), cfg.clip_min, cfg.clip_max)
    return (np.ones(d) if best is None else np.asarray(best)), best_loss


def float64_logits_fn(loaded):
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), loaded.variables)
    return lambda g, x: loaded.module.apply(v64, x, gates=g)


def test_dgr_matches_plain_per_image_loop(resnet20, images):
    """The batched, scan-compiled DGR is Algorithm 1: equal to the plain loop.

    DGR's 30 SGD steps amplify float32 rounding chaotically (a 1e-6 relative
    change of the input moves some gates by ~0.5 after 6 steps, in the plain
    loop itself), so the algorithms are compared in float64, over all T=30.
    """
    x, _ = images
    with jax.enable_x64():
        lf = float64_logits_fn(resnet20)
        x64 = np.asarray(x[:1], np.float64)
        cfg = DGRConfig()
        r = jax.jit(partial(dgr_route, lf, resnet20.spec, config=cfg))(x64)
        ref, ref_loss = reference_dgr(lf, resnet20.spec, x64[0], cfg)
        assert r.cdrp.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(r.cdrp[0]), ref, atol=1e-8)
        np.testing.assert_allclose(float(r.loss[0]), ref_loss, rtol=1e-10)


def test_dgr_with_column_paired_convs_matches_plain_loop(resnet20, images, monkeypatch):
    """The CPU fast path (narrow convs over column pairs, jaxroute.utils.conv_grads) routes
    exactly as Algorithm 1 written plainly: float64, T = 30, two images."""
    if jax.default_backend() != "cpu":
        pytest.skip("column pairing is a CPU formulation")
    monkeypatch.setenv("JAXROUTE_CONV_GRADS", "paired")
    x, _ = images
    with jax.enable_x64():
        lf = float64_logits_fn(resnet20)
        x64 = np.asarray(x[3:5], np.float64)
        route = jax.jit(partial(dgr_route, lf, resnet20.spec, config=DGRConfig()))
        assert "tensor<3x2x32x32xf64>" in route.lower(x64).as_text()  # the paired kernel is used
        r = route(x64)
        for i in range(2):
            ref, ref_loss = reference_dgr(lf, resnet20.spec, x64[i], DGRConfig())
            np.testing.assert_allclose(np.asarray(r.cdrp[i]), ref, atol=1e-8)
            np.testing.assert_allclose(float(r.loss[i]), ref_loss, rtol=1e-10)


def test_batch_invariance_across_batch_shapes_float64(resnet20, images):
    x, _ = images
    with jax.enable_x64():
        lf = float64_logits_fn(resnet20)
        x64 = np.asarray(x[:12], np.float64)
        route = jax.jit(partial(dgr_route, lf, resnet20.spec, config=DGRConfig()))
        batch = route(x64)
        for i in (0, 11):
            alone = route(x64[i : i + 1])
            np.testing.assert_allclose(np.asarray(alone.cdrp[0]), np.asarray(batch.cdrp[i]), atol=1e-8)


def test_dgr_output_invariants(resnet20, images):
    x, _ = images
    x = x[::2]
    spec = resnet20.spec
    cfg = DGRConfig()
    r = jax.jit(partial(dgr_route, resnet20.logits_fn(), spec, config=cfg))(x)
    cdrp = np.asarray(r.cdrp)
    assert cdrp.shape == (len(x), spec.size)
    assert cdrp.min() >= cfg.clip_min and cdrp.max() <= cfg.clip_max
    kept = ~np.asarray(r.fell_back)
    # Kept gates always preserve the full model's top-1 (that is how they are chosen).
    assert np.all(np.asarray(r.gated_pred) == np.asarray(r.pred))
    assert kept.mean() > 0.5
    # Routing paths are sparse and beat the all-ones loss.
    assert np.mean(cdrp[kept] > 0) < 0.9
    full_loss = -np.sum(jax.nn.softmax(r.full_logits) * jax.nn.log_softmax(r.full_logits), -1) + cfg.gamma * spec.size
    assert np.all(np.asarray(r.loss)[kept] < np.asarray(full_loss)[kept])
    # The returned gated logits are those of the kept gates.
    again = resnet20.logits_fn()(unflatten_gates(spec, r.cdrp), x)
    np.testing.assert_allclose(np.asarray(again), np.asarray(r.gated_logits), rtol=1e-4, atol=1e-4)
    # The gate tree view round-trips to the CDRP.
    np.testing.assert_array_equal(np.asarray(flatten_gates(spec, r.gates(spec))), cdrp)


def test_batch_invariance_alone_vs_batch_of_256(resnet20, images):
    """float32, one compiled batch shape (as every job uses): bit-identical."""
    x, _ = images
    rng = np.random.default_rng(0)
    big = np.concatenate([x] * 13)[:256]
    big = np.clip(big + rng.normal(0, 0.01, big.shape).astype(np.float32), 0, 1)
    router = make_router(resnet20, "dgr", DGRConfig(steps=2))
    batch = route_array(router, big, 256)
    for i in (17, 255):
        alone = route_array(router, big[i : i + 1], 256)
        np.testing.assert_array_equal(alone["cdrp"][0], batch["cdrp"][i])
        np.testing.assert_array_equal(alone["loss"][0], batch["loss"][i])


def test_optimizer_is_swappable(resnet20, images):
    x, _ = images
    spec = resnet20.spec
    cfg = DGRConfig(steps=4)
    adam = jax.jit(partial(dgr_route, resnet20.logits_fn(), spec, config=cfg, optimizer=optax.adam(0.05)))(x[:4])
    sgd = jax.jit(partial(dgr_route, resnet20.logits_fn(), spec, config=cfg))(x[:4])
    assert not np.allclose(np.asarray(adam.cdrp), np.asarray(sgd.cdrp))
    assert np.all(np.asarray(adam.gated_pred) == np.asarray(adam.pred))


def test_dgr_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        DGRConfig(steps=0)
    with pytest.raises(ValueError, match="clip"):
        DGRConfig(clip_min=1, clip_max=0)


def test_awr_aar_keep_prediction_and_prune(resnet20, images):
    x, _ = images
    spec = resnet20.spec
    ws = weight_l1_scores(resnet20.variables["params"], spec)
    assert ws.shape == (spec.size,) and np.all(np.asarray(ws) > 0)

    def capture_fn(g, x):
        logits, cap = resnet20.module.apply(resnet20.variables, x, gates=g, capture=True)
        return logits, cap["gates"]

    for method in ("awr", "aar"):
        r = jax.jit(partial(prune_route, capture_fn, spec, method=method, weight_scores=ws))(x)
        cdrp = np.asarray(r.cdrp)
        assert set(np.unique(cdrp)) <= {0.0, 1.0}
        assert np.all(np.asarray(r.gated_pred) == np.asarray(r.pred))
        it = np.asarray(r.iterations)
        # After `it` accepted iterations, layer l has round(2% * C_l * it) channels pruned.
        for (name, c), o in zip(spec, spec.offsets):
            np.testing.assert_array_equal(cdrp[:, o : o + c].sum(-1), c - np.round(0.02 * c * it), err_msg=name)
        assert it.mean() > 1


def test_ablation_top_hurts_more_than_bottom(resnet20, images):
    x, y = images
    spec = resnet20.spec
    r = jax.jit(partial(dgr_route, resnet20.logits_fn(), spec, config=DGRConfig(steps=15)))(x)
    m = ablation_mask(r.cdrp, 0.5, "top")
    crit = np.asarray(r.cdrp) > 0
    np.testing.assert_array_equal(np.asarray(m)[~crit], 1.0)
    np.testing.assert_allclose((np.asarray(m) == 0).sum(-1), np.round(0.5 * crit.sum(-1)))
    top = ablation_curve(resnet20.logits_fn(), spec, x, y, r.cdrp, (0.0, 0.3), "top")
    bottom = ablation_curve(resnet20.logits_fn(), spec, x, y, r.cdrp, (0.0, 0.3), "bottom")
    assert top["top1"][0] == bottom["top1"][0]
    assert top["top1"][1] < bottom["top1"][1]


def test_routing_metrics():
    cdrp = np.array([[0.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    full = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])
    gated = np.array([[0.0, 1.0, 0.9], [0.0, 3.0, 1.0]])
    m = routing_metrics(cdrp, full, gated, np.array([1, 0]))
    assert m["top1_agreement"] == 0.5
    assert m["full_top1"] == 1.0 and m["top1_accuracy"] == 0.5
    assert m["sparsity"] == pytest.approx(0.75) and m["sparsity_std"] == pytest.approx(0.25)
