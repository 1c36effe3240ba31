"""Routers (DGR, AWR, AAR), ablation and metrics.

The first part runs in a fresh clone, on the digits CNN trained by the
``digits_ckpt`` fixture; the second on the pretrained ResNet-20 and real
CIFAR-10 images from ../shared (skipped when absent).
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxroute.models import flatten_gates, unflatten_gates
from jaxroute.routing import (
    ROUTERS, DGRConfig, PruneConfig, Route, aar_route, ablation_curve, ablation_mask, awr_route, dgr_loss,
    dgr_route, dgr_route_pair, route_outputs, router_config, routing_metrics, weight_l1_scores,
)


# ---------------------------------------------------------------- helpers

def reference_dgr(model, x1, cfg: DGRConfig, state=None, out_state=None):
    """Algorithm 1 written out for ONE image, the plain way: a Python loop, a
    fresh optimizer, a full forward/backward at every step (no shortcuts).

    Candidates: Λ_1..Λ_T (``iterates="after_step"``), or Λ_0..Λ_{T-1} with Λ_0
    competing on loss (``iterates="official"``)."""
    spec = model.spec
    d = spec.size
    fwd = jax.jit(lambda g: model.logits(x1[None], unflatten_gates(spec, g[None]))[0])
    full = fwd(jnp.ones(d))
    p = jax.nn.softmax(full)
    pred = int(jnp.argmax(full))

    def loss_ce(g):
        return -jnp.sum(p * jax.nn.log_softmax(fwd(g)))

    vg = jax.jit(jax.value_and_grad(loss_ce))
    opt = optax.sgd(cfg.lr, momentum=cfg.momentum)
    g = jnp.ones(d)
    state = opt.init(g) if state is None else state  # the official release reuses one optimizer per pair
    best, best_loss = None, np.inf
    first, last = (0, cfg.steps - 1) if cfg.iterates == "official" else (1, cfg.steps)
    for t in range(cfg.steps + 1):
        ce, grad = vg(g)
        loss = float(ce + cfg.gamma * jnp.sum(jnp.abs(g)))
        if first <= t <= last and int(jnp.argmax(fwd(g))) == pred and loss < best_loss:
            best, best_loss = g, loss
        if t == cfg.steps:
            break
        upd, state = opt.update(grad + cfg.gamma * jnp.sign(g), state, g)
        g = jnp.clip(optax.apply_updates(g, upd), cfg.clip_min, cfg.clip_max)
    if out_state is not None:
        out_state.append(state)
    if best is None:                                            # the fallback: Λ_0 and its loss
        return np.ones(d), float(-jnp.sum(p * jax.nn.log_softmax(full)) + cfg.gamma * d)
    return np.asarray(best), best_loss


def float64_model(model):
    """The same model with float64 variables (use inside ``jax.enable_x64()``)."""
    return model.with_variables(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), model.variables))


def run_padded(fn, x, batch: int) -> dict:
    """Run a jitted per-sample ``fn(x) -> dict`` on fixed-shape batches of ``batch`` rows, as the
    extraction job does (the last batch padded by repeating its last image); keep the real rows."""
    outs = []
    for lo in range(0, len(x), batch):
        b = x[lo:lo + batch]
        nv = len(b)
        if nv < batch:
            b = np.concatenate([b, np.repeat(b[-1:], batch - nv, axis=0)])
        outs.append({k: np.asarray(v)[:nv] for k, v in jax.device_get(fn(b)).items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def check_route_fields(r: Route, model, x):
    """Invariants every router's output has: shapes, the kept gates' logits, the full model's logits."""
    b, d = len(x), model.spec.size
    assert r.cdrp.shape == (b, d)
    for f in ("loss", "fell_back", "iterations", "pred", "gated_pred"):
        assert getattr(r, f).shape == (b,), f
    assert r.fell_back.dtype == jnp.bool_ and r.iterations.dtype == jnp.int32
    full = np.asarray(model.logits(x))
    np.testing.assert_allclose(np.asarray(r.full_logits), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(r.pred), np.asarray(r.full_logits).argmax(-1))
    np.testing.assert_allclose(np.asarray(r.gated_logits), np.asarray(model.logits(x, r.cdrp)), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(r.gated_pred), np.asarray(r.gated_logits).argmax(-1))
    # the kept gates always preserve the full model's top-1 (that is how they are chosen)
    np.testing.assert_array_equal(np.asarray(r.gated_pred), np.asarray(r.pred))
    np.testing.assert_array_equal(np.asarray(r.fell_back), np.asarray(r.iterations) == 0)
    fb = np.asarray(r.fell_back)
    np.testing.assert_array_equal(np.asarray(r.cdrp)[fb], 1.0)     # a fallback keeps the full network
    # the gate tree view round-trips to the CDRP
    np.testing.assert_array_equal(np.asarray(flatten_gates(model.spec, r.gates(model.spec))), np.asarray(r.cdrp))


# ================================================================ digits CNN (fresh clone)

@pytest.fixture(scope="module")
def dx(digits_test):
    """48 digits test images and labels."""
    return digits_test.images[:48], digits_test.labels[:48]


@pytest.mark.parametrize("cfg", [DGRConfig(), DGRConfig(iterates="official"),
                                 DGRConfig(steps=8, lr=0.5, gamma=0.3)], ids=["paper", "official", "strong"])
def test_dgr_matches_plain_per_image_loop_float64_digits(digits_model, dx, cfg):
    """The batched, scan-compiled DGR is Algorithm 1: in float64, equal to the plain per-image loop
    over all T steps, for each image of a batch, under both iterate rules."""
    x, _ = dx
    with jax.enable_x64():
        m64 = float64_model(digits_model)
        x64 = np.asarray(x[:3], np.float64)
        r = jax.jit(partial(dgr_route, m64, config=cfg))(x64)
        assert r.cdrp.dtype == jnp.float64
        for i in range(len(x64)):
            ref, ref_loss = reference_dgr(m64, x64[i], cfg)
            np.testing.assert_allclose(np.asarray(r.cdrp[i]), ref, atol=1e-8)
            np.testing.assert_allclose(float(r.loss[i]), ref_loss, rtol=1e-10)


def test_dgr_route_pair_carries_the_momentum_like_the_official_loop(digits_model, dx, tmp_path):
    """dgr_route_pair = the plain loop routing x and then x' with ONE optimizer (momentum carried, gates
    reset); the route job's ``momentum_from`` gives the same second routes."""
    from jaxroute.data import Dataset
    from jaxroute.extraction import load_shards, plan_batches
    from jaxroute.routing import route_dataset

    x, y = dx
    cfg = DGRConfig(steps=6, lr=0.5, gamma=0.2)
    x2 = np.clip(x[3:6] + 0.05, 0.0, 1.0)
    with jax.enable_x64():
        m64 = float64_model(digits_model)
        a, b = np.asarray(x[:3], np.float64), np.asarray(x2, np.float64)
        first, second = jax.jit(partial(dgr_route_pair, m64, config=cfg))(a, b)
        fresh = jax.jit(partial(dgr_route, m64, config=cfg))(b)
        for i in range(3):
            st = []
            ref1, _ = reference_dgr(m64, a[i], cfg, out_state=st)
            ref2, ref2_loss = reference_dgr(m64, b[i], cfg, state=st[0])
            np.testing.assert_allclose(np.asarray(first.cdrp[i]), ref1, atol=1e-8)
            np.testing.assert_allclose(np.asarray(second.cdrp[i]), ref2, atol=1e-8)
            np.testing.assert_allclose(float(second.loss[i]), ref2_loss, rtol=1e-10)
        assert not np.allclose(np.asarray(second.cdrp), np.asarray(fresh.cdrp))  # the momentum matters
    ds = Dataset(np.asarray(x2, np.float32), np.asarray(y[3:6], np.int32), tuple(map(str, range(10))), "adv")
    route_dataset(digits_model, ds, tmp_path / "r", plan=plan_batches(3, 4, 4), config=cfg, progress=False,
                  momentum_from=np.asarray(x[:3], np.float32))
    _, want = jax.jit(partial(dgr_route_pair, digits_model, config=cfg))(jnp.asarray(x[:3]), jnp.asarray(x2))
    np.testing.assert_allclose(load_shards(tmp_path / "r")["cdrp"], np.asarray(want.cdrp), atol=1e-5)
    with pytest.raises(ValueError, match="momentum_from has 2 images"):
        route_dataset(digits_model, ds, tmp_path / "s", plan=plan_batches(3, 4, 4), config=cfg, progress=False,
                      momentum_from=np.asarray(x[:2], np.float32))


def test_dgr_batch_invariance_digits(digits_model, dx):
    """One compiled batch shape: an image routed alone (padded to the batch) or among others gets
    bit-identical gates, loss and kept iterate."""
    x, _ = dx
    fn = route_outputs(digits_model, "dgr", DGRConfig(steps=10))
    batch = run_padded(fn, x, 16)
    for i in (0, 21, 47):
        alone = run_padded(fn, x[i:i + 1], 16)
        for k in ("cdrp", "loss", "iterations", "gated_logits"):
            np.testing.assert_array_equal(alone[k][0], batch[k][i], err_msg=f"{k} of image {i}")
    # and among other neighbours: the batch shifted by 5 images
    shifted = run_padded(fn, x[5:21], 16)
    np.testing.assert_array_equal(shifted["cdrp"], batch["cdrp"][5:21])


def test_dgr_route_invariants_digits(digits_model, dx):
    x, _ = dx
    cfg = DGRConfig()
    r = jax.jit(partial(dgr_route, digits_model, config=cfg))(x)
    check_route_fields(r, digits_model, x)
    cdrp = np.asarray(r.cdrp)
    assert cdrp.min() >= cfg.clip_min and cdrp.max() <= cfg.clip_max
    it = np.asarray(r.iterations)
    assert it.min() >= 0 and it.max() <= cfg.steps
    kept = ~np.asarray(r.fell_back)
    assert kept.mean() > 0.5
    # the loss is the DGR objective at the kept gates, and beats the all-ones loss
    p = jax.nn.softmax(r.full_logits)
    loss, _ = dgr_loss(r.gated_logits, p, r.cdrp, cfg.gamma)
    np.testing.assert_allclose(np.asarray(r.loss), np.asarray(loss), rtol=1e-5)
    full_loss, _ = dgr_loss(r.full_logits, p, jnp.ones_like(r.cdrp), cfg.gamma)
    assert np.all(np.asarray(r.loss)[kept] < np.asarray(full_loss)[kept])
    # routing paths are sparse
    assert np.mean(cdrp[kept] > 0) < 0.9


def test_dgr_fallback_keeps_the_full_network(digits_model, dx):
    """One step with lr * gamma >= 1 drives every gate to 0, leaving the classifier's bias: only
    images whose prediction is the bias's class keep that iterate, the others fall back to all ones."""
    x, _ = dx
    cfg = DGRConfig(steps=1, lr=1.0, momentum=0.0, gamma=2.0)
    r = jax.jit(partial(dgr_route, digits_model, config=cfg))(x)
    check_route_fields(r, digits_model, x)
    bias_class = int(np.argmax(digits_model.variables["params"]["linear"]["bias"]))
    expect_kept = np.asarray(r.pred) == bias_class
    assert expect_kept.any() and (~expect_kept).any()
    np.testing.assert_array_equal(~np.asarray(r.fell_back), expect_kept)
    np.testing.assert_array_equal(np.asarray(r.cdrp)[expect_kept], 0.0)
    np.testing.assert_array_equal(np.asarray(r.iterations)[expect_kept], 1)
    fb = np.asarray(r.fell_back)
    np.testing.assert_array_equal(np.asarray(r.gated_logits)[fb], np.asarray(r.full_logits)[fb])
    p = jax.nn.softmax(r.full_logits)
    init_loss, _ = dgr_loss(r.full_logits, p, jnp.ones_like(r.cdrp), cfg.gamma)
    np.testing.assert_allclose(np.asarray(r.loss)[fb], np.asarray(init_loss)[fb], rtol=1e-6)


def test_optimizer_is_swappable_digits(digits_model, dx):
    x, _ = dx
    x = x[:8]
    cfg = DGRConfig(steps=4)
    adam = jax.jit(partial(dgr_route, digits_model, config=cfg, optimizer=optax.adam(0.05)))(x)
    sgd = jax.jit(partial(dgr_route, digits_model, config=cfg))(x)
    assert not np.allclose(np.asarray(adam.cdrp), np.asarray(sgd.cdrp))
    assert np.all(np.asarray(adam.gated_pred) == np.asarray(adam.pred))


@pytest.mark.parametrize("field, value, needle", [
    ("steps", 0, "steps"), ("steps", 2.0, "steps"), ("steps", True, "steps"), ("steps", -3, "steps"),
    ("lr", 0.0, "lr"), ("lr", -0.1, "lr"), ("lr", float("nan"), "lr"), ("lr", float("inf"), "lr"),
    ("lr", "0.1", "lr"), ("momentum", 1.0, "momentum"), ("momentum", -0.1, "momentum"),
    ("momentum", float("nan"), "momentum"), ("gamma", -0.01, "gamma"), ("gamma", float("inf"), "gamma"),
    ("gamma", None, "gamma"), ("clip_min", float("nan"), "clip_min"), ("clip_max", float("inf"), "clip_max"),
    ("clip_max", False, "clip_max"), ("iterates", "before_step", "iterates"),
])
def test_dgr_config_validates_every_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        DGRConfig(**{field: value})


def test_dgr_config_rejects_bad_clip_range_and_keeps_paper_defaults():
    with pytest.raises(ValueError, match="clip"):
        DGRConfig(clip_min=1, clip_max=0)
    with pytest.raises(ValueError, match="clip"):
        DGRConfig(clip_min=2.0, clip_max=2.0)
    d = DGRConfig()
    assert (d.steps, d.lr, d.momentum, d.gamma, d.clip_min, d.clip_max) == (30, 0.1, 0.9, 0.05, 0.0, 10.0)
    assert d.iterates == "after_step"
    assert DGRConfig(momentum=0.0, gamma=0.0).momentum == 0.0   # the closed ends of the ranges are valid


def test_weight_l1_scores_digits(digits_model):
    """l1 norm of each channel's kernel, times |gamma| / sqrt(var + 1e-5) of the BN after the conv."""
    spec, v = digits_model.spec, digits_model.variables
    plain = np.asarray(weight_l1_scores(v, spec, bn_scale=False))
    scaled = np.asarray(weight_l1_scores(v, spec))
    assert plain.shape == scaled.shape == (spec.size,) and np.all(plain > 0) and np.all(scaled >= 0)
    for k, ((name, c), o) in enumerate(zip(spec, spec.offsets), start=1):
        kernel = np.abs(np.asarray(v["params"][name]["kernel"])).sum(axis=(0, 1, 2))
        np.testing.assert_allclose(plain[o:o + c], kernel, rtol=1e-5, err_msg=name)
        bn = f"bn{k}"
        factor = np.abs(v["params"][bn]["scale"]) / np.sqrt(v["batch_stats"][bn]["var"] + 1e-5)
        np.testing.assert_allclose(scaled[o:o + c], kernel * factor, rtol=1e-5, err_msg=name)


def pruned_count(rule, c, it, frac=0.02):
    """Channels of a c-channel layer pruned after ``it`` iterations, written from the rule's definition."""
    it = np.asarray(it, np.float64)
    if rule == "linear":                   # frac of all channels per iteration
        return np.minimum(np.round(frac * c * it), c)
    return np.minimum(np.round(c * (1 - (1 - frac) ** it)), c)   # frac of the remaining channels


def check_pruned_route(r, model, x, cfg: PruneConfig):
    """Binary masks with the rule's channel count per layer, and the DGR loss of the kept mask."""
    check_route_fields(r, model, x)
    spec = model.spec
    cdrp = np.asarray(r.cdrp)
    assert set(np.unique(cdrp)) <= {0.0, 1.0}
    it = np.asarray(r.iterations)
    assert it.min() >= 0 and it.max() <= cfg.iterations(spec)
    for (name, c), o in zip(spec, spec.offsets):
        np.testing.assert_array_equal(c - cdrp[:, o:o + c].sum(-1), pruned_count(cfg.rule, c, it, cfg.frac),
                                      err_msg=name)
    p = jax.nn.softmax(r.full_logits)
    loss, _ = dgr_loss(r.gated_logits, p, r.cdrp, cfg.gamma)
    np.testing.assert_allclose(np.asarray(r.loss), np.asarray(loss), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["awr", "aar"])
@pytest.mark.parametrize("cfg", [PruneConfig(), PruneConfig(rule="linear", select="last")],
                         ids=["remaining-lowest_loss", "linear-last"])
def test_awr_aar_invariants_digits(digits_model, dx, method, cfg):
    x, _ = dx
    router = {"awr": awr_route, "aar": aar_route}[method]
    r = jax.jit(partial(router, digits_model, config=cfg))(x)
    check_pruned_route(r, digits_model, x, cfg)
    assert np.asarray(r.iterations).mean() > 1


@pytest.mark.parametrize("select", ["lowest_loss", "last"])
def test_awr_walks_the_weight_ranking_and_selects_as_configured(digits_model, dx, select):
    """AWR's ranking is fixed, so its walk can be written out: iterate n prunes each layer's
    pruned_count(n) lowest-scored channels; a sample walks until its top-1 changes; ``last`` keeps
    the last iterate before that, ``lowest_loss`` the walked iterate of lowest DGR loss."""
    x, _ = dx
    spec = digits_model.spec
    cfg = PruneConfig(select=select)
    r = jax.jit(partial(awr_route, digits_model, config=cfg))(x)
    ws = np.asarray(weight_l1_scores(digits_model.variables, spec))
    order = [np.argsort(ws[o:o + c], kind="stable") for c, o in zip(spec.channels, spec.offsets)]

    def mask_after(n):
        m = np.ones(spec.size, np.float32)
        for od, c, o in zip(order, spec.channels, spec.offsets):
            m[o + od[: int(pruned_count(cfg.rule, c, n, cfg.frac))]] = 0.0
        return m

    full = np.asarray(digits_model.logits(x))
    pred = full.argmax(-1)
    p = np.asarray(jax.nn.softmax(full))
    n_max = cfg.iterations(spec)
    masks = np.stack([mask_after(n) for n in range(n_max + 1)])          # (n_max + 1, D)
    expected = []
    for b in range(len(x)):
        logits = np.asarray(digits_model.logits(np.repeat(x[b:b + 1], n_max + 1, 0), masks))
        walked = []
        for n in range(1, n_max + 1):
            if logits[n].argmax() != pred[b] or np.array_equal(masks[n], masks[n - 1]):
                break
            walked.append(n)
        if not walked:
            expected.append(0)
        elif select == "last":
            expected.append(walked[-1])
        else:
            ce = -np.sum(p[b] * np.asarray(jax.nn.log_softmax(logits[walked])), -1)
            expected.append(walked[int(np.argmin(ce + cfg.gamma * masks[walked].sum(-1)))])
    expected = np.asarray(expected)
    assert expected.max() > 0 and (select == "lowest_loss" or len(set(expected)) > 1)
    np.testing.assert_array_equal(np.asarray(r.iterations), expected)
    np.testing.assert_array_equal(np.asarray(r.cdrp), masks[expected])


@pytest.mark.parametrize("kwargs, needle", [
    ({"frac": 0.0}, "fraction"), ({"frac": 1.0}, "fraction"), ({"frac": True}, "fraction"),
    ({"frac": float("nan")}, "fraction"), ({"max_iters": 0}, "max_iters"), ({"max_iters": 2.5}, "max_iters"),
    ({"rule": "all"}, "rule"), ({"select": "best"}, "select"), ({"gamma": -1.0}, "gamma"),
    ({"gamma": float("inf")}, "gamma"),
])
def test_prune_config_validates(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        PruneConfig(**kwargs)


def test_prune_config_iterations_and_counts(digits_model):
    spec = digits_model.spec                                           # widest layer: 128 channels
    assert PruneConfig(rule="linear").iterations(spec) == 50
    assert PruneConfig(frac=0.3, rule="linear").iterations(spec) == 4
    assert PruneConfig(max_iters=7).iterations(spec) == 7
    n = PruneConfig().iterations(spec)                                 # enough to prune every channel
    assert pruned_count("remaining", 128, n) == 128 and pruned_count("remaining", 128, n - 1) < 128
    for rule in ("remaining", "linear"):
        cfg = PruneConfig(rule=rule)
        for c in (16, 32, 128):
            its = np.arange(0, 60)
            np.testing.assert_array_equal(np.asarray(cfg.pruned_after(c, its)), pruned_count(rule, c, its))
    # the published rule does not freeze a narrow layer: 2% of 16 channels is less than one
    assert pruned_count("remaining", 16, 2) == 1 and pruned_count("linear", 16, 1) == 0


def test_routers_registry_and_route_outputs(digits_model, dx):
    x, _ = dx
    x = x[:8]
    assert sorted(ROUTERS) == ["aar", "awr", "controller", "dgr"]
    for name, (router, cls) in ROUTERS.items():
        assert router_config(name) == cls()
    for name in ("dgr", "awr", "aar"):  # controller needs a decoupled model: tests/test_decoupling_route.py
        cls = ROUTERS[name][1]
        fn = route_outputs(digits_model, name, cls(steps=2) if cls is DGRConfig else cls(max_iters=3))
        out = jax.device_get(fn(x))
        assert set(out) == set(Route._fields) | {"features"}, name
        assert out["cdrp"].shape == (8, digits_model.spec.size)
        np.testing.assert_allclose(out["features"], np.asarray(digits_model.capture(x).features), rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_array_equal(out["gated_pred"], out["pred"])
    # fn(x, labels, index) is the extraction job's shape; labels and index do not change the result
    fn = route_outputs(digits_model, "dgr", DGRConfig(steps=2))
    a = jax.device_get(fn(x))
    b = jax.device_get(fn(x, np.zeros(8, np.int32), np.arange(8)))
    np.testing.assert_array_equal(a["cdrp"], b["cdrp"])
    with pytest.raises(ValueError, match="unknown routing method 'nope'"):
        router_config("nope")
    with pytest.raises(TypeError, match="takes a PruneConfig, got DGRConfig"):
        router_config("awr", DGRConfig())


def test_ablation_mask_rules():
    rng = np.random.default_rng(0)
    cdrp = rng.uniform(0, 2, (5, 40)).astype(np.float32)
    cdrp[cdrp < 0.6] = 0.0
    crit = cdrp > 0
    for order in ("top", "bottom"):
        for f in (0.0, 0.3, 1.0):
            m = np.asarray(ablation_mask(jnp.asarray(cdrp), f, order))
            np.testing.assert_array_equal(m[~crit], 1.0)          # non-critical nodes stay on
            np.testing.assert_array_equal((m == 0).sum(-1), np.round(f * crit.sum(-1)))
        off = np.asarray(ablation_mask(jnp.asarray(cdrp), 0.3, order)) == 0
        for b in range(5):  # the top (bottom) valued critical nodes are the ones removed
            vals_off, vals_on = cdrp[b][off[b]], cdrp[b][crit[b] & ~off[b]]
            if order == "top":
                assert vals_off.min() >= vals_on.max()
            else:
                assert vals_off.max() <= vals_on.min()
    with pytest.raises(ValueError, match="order"):
        ablation_mask(jnp.asarray(cdrp), 0.1, "middle")


def test_ablation_curve_digits(digits_model, dx):
    x, y = dx
    r = jax.jit(partial(dgr_route, digits_model, config=DGRConfig(steps=10)))(x)
    top = ablation_curve(digits_model, x, y, r.cdrp, (0.0, 1.0), "top")
    bottom = ablation_curve(digits_model, x, y, r.cdrp, (0.0, 1.0), "bottom")
    full_top1 = float(np.mean(np.asarray(digits_model.logits(x)).argmax(-1) == y))
    assert top["fractions"] == [0.0, 1.0] and top["order"] == "top"
    assert top["top1"][0] == bottom["top1"][0] == pytest.approx(full_top1)
    assert top["top1"][1] == bottom["top1"][1]                 # all critical nodes off, either way
    assert top["top1"][1] < top["top1"][0] and all(0 <= a <= 1 for a in top["top5"])


def test_routing_metrics():
    cdrp = np.array([[0.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    full = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]])
    gated = np.array([[0.0, 1.0, 0.9], [0.0, 3.0, 1.0]])
    m = routing_metrics(cdrp, full, gated, np.array([1, 0]))
    assert m["top1_agreement"] == 0.5
    assert m["full_top1"] == 1.0 and m["top1_accuracy"] == 0.5
    assert m["sparsity"] == pytest.approx(0.75) and m["sparsity_std"] == pytest.approx(0.25)


# ================================================================ pretrained ResNet-20 (../shared)

@pytest.fixture(scope="module")
def images(cifar10_sample):
    """Two real CIFAR-10 test images per class, by class."""
    return cifar10_sample


def test_dgr_matches_plain_per_image_loop(resnet20, images):
    """The batched, scan-compiled DGR is Algorithm 1: equal to the plain loop.

    DGR's 30 SGD steps amplify float32 rounding chaotically (a 1e-6 relative
    change of the input moves some gates by ~0.5 after 6 steps, in the plain
    loop itself), so the algorithms are compared in float64, over all T=30.
    """
    x, _ = images
    with jax.enable_x64():
        m64 = float64_model(resnet20)
        x64 = np.asarray(x[:1], np.float64)
        cfg = DGRConfig()
        r = jax.jit(partial(dgr_route, m64, config=cfg))(x64)
        ref, ref_loss = reference_dgr(m64, x64[0], cfg)
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
        m64 = float64_model(resnet20)
        x64 = np.asarray(x[3:5], np.float64)
        route = jax.jit(partial(dgr_route, m64, config=DGRConfig()))
        assert "tensor<3x2x32x32xf64>" in route.lower(x64).as_text()  # the paired kernel is used
        r = route(x64)
        for i in range(2):
            ref, ref_loss = reference_dgr(m64, x64[i], DGRConfig())
            np.testing.assert_allclose(np.asarray(r.cdrp[i]), ref, atol=1e-8)
            np.testing.assert_allclose(float(r.loss[i]), ref_loss, rtol=1e-10)


# slow: test_dgr_batch_invariance_digits and test_batch_invariance_alone_vs_batch_of_256 cover it by default
@pytest.mark.slow
def test_batch_invariance_across_batch_shapes_float64(resnet20, images):
    x, _ = images
    with jax.enable_x64():
        m64 = float64_model(resnet20)
        x64 = np.asarray(x[:12], np.float64)
        route = jax.jit(partial(dgr_route, m64, config=DGRConfig()))
        batch = route(x64)
        for i in (0, 11):
            alone = route(x64[i : i + 1])
            np.testing.assert_allclose(np.asarray(alone.cdrp[0]), np.asarray(batch.cdrp[i]), atol=1e-8)


# slow: test_dgr_route_invariants_digits checks the same invariants by default
@pytest.mark.slow
def test_dgr_output_invariants(resnet20, images):
    x, _ = images
    x = x[::2]
    spec = resnet20.spec
    cfg = DGRConfig()
    r = jax.jit(partial(dgr_route, resnet20, config=cfg))(x)
    check_route_fields(r, resnet20, x)
    cdrp = np.asarray(r.cdrp)
    assert cdrp.min() >= cfg.clip_min and cdrp.max() <= cfg.clip_max
    kept = ~np.asarray(r.fell_back)
    assert kept.mean() > 0.5
    # Routing paths are sparse and beat the all-ones loss.
    assert np.mean(cdrp[kept] > 0) < 0.9
    full_loss = -np.sum(jax.nn.softmax(r.full_logits) * jax.nn.log_softmax(r.full_logits), -1) + cfg.gamma * spec.size
    assert np.all(np.asarray(r.loss)[kept] < np.asarray(full_loss)[kept])


def test_batch_invariance_alone_vs_batch_of_256(resnet20, images):
    """float32, one compiled batch shape (as every job uses): bit-identical."""
    x, _ = images
    rng = np.random.default_rng(0)
    big = np.concatenate([x] * 13)[:256]
    big = np.clip(big + rng.normal(0, 0.01, big.shape).astype(np.float32), 0, 1)
    fn = route_outputs(resnet20, "dgr", DGRConfig(steps=2))
    batch = run_padded(fn, big, 256)
    for i in (17, 255):
        alone = run_padded(fn, big[i : i + 1], 256)
        np.testing.assert_array_equal(alone["cdrp"][0], batch["cdrp"][i])
        np.testing.assert_array_equal(alone["loss"][0], batch["loss"][i])


# slow: test_optimizer_is_swappable_digits checks the same by default
@pytest.mark.slow
def test_optimizer_is_swappable(resnet20, images):
    x, _ = images
    cfg = DGRConfig(steps=4)
    adam = jax.jit(partial(dgr_route, resnet20, config=cfg, optimizer=optax.adam(0.05)))(x[:4])
    sgd = jax.jit(partial(dgr_route, resnet20, config=cfg))(x[:4])
    assert not np.allclose(np.asarray(adam.cdrp), np.asarray(sgd.cdrp))
    assert np.all(np.asarray(adam.gated_pred) == np.asarray(adam.pred))


@pytest.mark.slow
def test_awr_aar_keep_prediction_and_prune(resnet20, images):
    x, _ = images
    spec = resnet20.spec
    ws = weight_l1_scores(resnet20.variables, spec, bn_scale=False)
    assert ws.shape == (spec.size,) and np.all(np.asarray(ws) > 0)
    for cfg in (PruneConfig(), PruneConfig(rule="linear", select="last")):
        for router in (awr_route, aar_route):
            r = jax.jit(partial(router, resnet20, config=cfg))(x)
            # binary masks keeping the top-1; after the kept iterate n, layer l has the rule's
            # count of channels pruned (round(C_l (1 - 0.98^n)) or round(0.02 C_l n))
            check_pruned_route(r, resnet20, x, cfg)
            assert np.asarray(r.iterations).mean() > 1


def test_ablation_top_hurts_more_than_bottom(resnet20, images):
    x, y = images
    r = jax.jit(partial(dgr_route, resnet20, config=DGRConfig(steps=15)))(x)
    m = ablation_mask(r.cdrp, 0.5, "top")
    crit = np.asarray(r.cdrp) > 0
    np.testing.assert_array_equal(np.asarray(m)[~crit], 1.0)
    np.testing.assert_allclose((np.asarray(m) == 0).sum(-1), np.round(0.5 * crit.sum(-1)))
    top = ablation_curve(resnet20, x, y, r.cdrp, (0.0, 0.3), "top")
    bottom = ablation_curve(resnet20, x, y, r.cdrp, (0.0, 0.3), "bottom")
    assert top["top1"][0] == bottom["top1"][0]
    assert top["top1"][1] < bottom["top1"][1]
