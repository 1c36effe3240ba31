"""Benchmark: what a decoupled CIFAR ResNet's calculation paths buy in single-thread CPU time.

    python -m benchmarks.decoupling --weights RUN_DIR              # a trained decoupled model
    python -m benchmarks.decoupling --quick                         # random controllers, 20 images

One thread (XLA and PyTorch), batch 1, median wall-clock per image over the
images, for

* ``dense``: the plain network (every filter);
* ``masked``: the decoupled network as trained (controllers, gates multiplied in; every filter computed);
* ``gathered``: :func:`jaxroute.decoupling.flops.gathered_forward`, weights sliced to the
  active filters, padded to a static per-layer capacity (the calibration images' maximum);
* ``static``: a plain network whose layers have exactly those capacities (no controllers,
  nothing gathered): the upper bound of what slicing to those widths can give;
* ``torch_slicing``: PyTorch eager, the same gathered computation with ``index_select``
  on the active filters (no capacity), the peer of the official deployment code;

plus batch-128 throughput of dense and masked, and the MAC ratio (dense / mean path MACs)
next to the time ratio (dense / gathered).  Without ``--weights`` the controllers are
random (so paths differ between images); their MACs are whatever those paths give.

``--profile`` adds where the gathered forward's time goes (:func:`profile`): every stage
(stem, each block, head) jitted alone and timed on the block inputs of the same images,
dense vs gathered vs statically pruned, and inside a gathered block its pieces (controller
and active-filter indices, weight gathers, the two convs at capacity next to the dense
convs, scatter back + residual); plus the per-call cost of an empty jitted function (to
read the stage sums against the whole-network times) and XLA's ``cost_analysis`` and HLO
op counts of the two compiled networks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One core for XLA and PyTorch alike: pin the process before either starts its thread pools.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import numpy as np  # noqa: E402


def _median_ms(fn, xs, warm=3):
    for x in xs[:warm]:
        fn(x)
    ts = []
    for x in xs:
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def _static_block(h, p, s, stride, c1, c2):
    """One option-A block with conv1 cut to its first ``c1`` filters and conv2 to ``c1`` -> ``c2``
    (``c1 = c2 = planes``: the dense block)."""
    import jax
    import jax.numpy as jnp

    from jaxroute.decoupling.flops import _bn, _conv

    planes = p["conv1"]["kernel"].shape[-1]
    i1, i2 = np.arange(c1), np.arange(c2)
    o = jax.nn.relu(_bn(_conv(h, p["conv1"]["kernel"][..., :c1], stride), p["bn1"], s["bn1"], i1))
    o = _bn(_conv(o, p["conv2"]["kernel"][:, :, :c1, :c2], 1), p["bn2"], s["bn2"], i2)
    if c2 < planes:
        o = jnp.pad(o, ((0, 0), (0, 0), (0, 0), (0, planes - c2)))
    return jax.nn.relu(o + _shortcut(h, planes, stride))


def _shortcut(h, planes, stride):
    """The option-A shortcut: identity, or subsampled and zero-padded to ``planes`` channels."""
    import jax.numpy as jnp

    if stride == 1 and h.shape[-1] == planes:
        return h
    q = planes // 4
    return jnp.pad(h[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (q, q)))


def _blocks(model):
    """``(params name, gate-point prefix, stride)`` of every block, forward order."""
    n = (model.module.depth - 2) // 6
    return [(f"layer{st}_{b}", f"layer{st}.{b}", 2 if (st > 1 and b == 0) else 1)
            for st in range(1, 4) for b in range(n)]


def _stem_head(model):
    import jax
    import jax.numpy as jnp

    from jaxroute.decoupling.flops import _bn, _conv

    P, S = model.variables["params"], model.variables["batch_stats"]
    mean, std = jnp.asarray(model.meta.mean), jnp.asarray(model.meta.std)

    def stem(x):
        return jax.nn.relu(_bn(_conv((x - mean) / std, P["conv1"]["kernel"], 1), P["bn1"], S["bn1"]))

    def head(h):
        return h.mean((1, 2)) @ P["linear"]["kernel"] + P["linear"]["bias"]

    return stem, head


def _static_pruned(model, caps):
    """Plain forward with every controlled conv cut to its first ``caps`` filters."""
    P, S = model.variables["params"], model.variables["batch_stats"]
    stem, head = _stem_head(model)

    def f(x):
        h = stem(x)
        for name, pre, stride in _blocks(model):
            h = _static_block(h, P[name], S[name], stride, caps[f"{pre}.conv1"], caps[f"{pre}.conv2"])
        return head(h)

    return f


def _torch_slicing(model):
    """PyTorch eager gathered forward (index_select on the active filters)."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a)))  # noqa: E731
    P, S = model.variables["params"], model.variables["batch_stats"]
    n = (int(model.meta.arch[6:]) - 2) // 6
    conv = lambda k: t(np.transpose(np.asarray(k), (3, 2, 0, 1)))  # noqa: E731  HWIO -> OIHW
    bn = lambda p, s: (t(p["scale"]) / torch.sqrt(t(s["var"]) + 1e-5), t(p["bias"]), t(s["mean"]))  # noqa: E731
    stem = (conv(P["conv1"]["kernel"]), bn(P["bn1"], S["bn1"]))
    blocks = []
    for st in range(1, 4):
        for b in range(n):
            p, s = P[f"layer{st}_{b}"], S[f"layer{st}_{b}"]
            ctrl = [(t(p[c]["fc1"]["kernel"]), t(p[c]["fc1"]["bias"]), t(p[c]["fc2"]["kernel"]), t(p[c]["fc2"]["bias"]))
                    for c in ("controller1", "controller2")]
            blocks.append((2 if (st > 1 and b == 0) else 1, conv(p["conv1"]["kernel"]), bn(p["bn1"], s["bn1"]),
                           conv(p["conv2"]["kernel"]), bn(p["bn2"], s["bn2"]), ctrl))
    lin_w, lin_b = t(P["linear"]["kernel"]), t(P["linear"]["bias"])
    mean = torch.tensor(model.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.meta.std).view(1, 3, 1, 1)

    def apply_bn(h, p, idx=None):
        a, c, m = p if idx is None else (p[0][idx], p[1][idx], p[2][idx])
        return (h - m.view(1, -1, 1, 1)) * a.view(1, -1, 1, 1) + c.view(1, -1, 1, 1)

    @torch.no_grad()
    def f(x):  # x: (1, 3, 32, 32) in [0, 1]
        h = F.relu(apply_bn(F.conv2d((x - mean) / std, stem[0], padding=1), stem[1]))
        for stride, k1, b1, k2, b2, ((w1a, c1a, w2a, c2a), (w1b, c1b, w2b, c2b)) in blocks:
            planes = k1.shape[0]
            g1 = F.relu(h.mean((2, 3)) @ w1a + c1a) @ w2a + c2a
            i1 = torch.nonzero(g1[0] > 0).flatten()
            o = F.relu(apply_bn(F.conv2d(h, k1.index_select(0, i1), stride=stride, padding=1), b1, i1))
            g2 = F.relu(o.mean((2, 3)) @ w1b.index_select(0, i1) + c1b) @ w2b + c2b
            i2 = torch.nonzero(g2[0] > 0).flatten()
            o = apply_bn(F.conv2d(o, k2.index_select(0, i2).index_select(1, i1), padding=1), b2, i2)
            sc = h
            if stride != 1 or h.shape[1] != planes:
                q = planes // 4
                sc = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, q, q))
            full = torch.zeros(1, planes, o.shape[2], o.shape[3])
            full[:, i2] = o
            h = F.relu(full + sc)
        return h.mean((2, 3)) @ lin_w + lin_b

    return f


def _hlo_ops(jitted, x) -> dict:
    """Counts of the costly HLO instructions of a jitted function compiled for ``x``, with XLA's
    cost analysis (the function's own compiled program where JAX has it cached)."""
    import re

    compiled = jitted.lower(x).compile()
    text = compiled.as_text()
    counts = {op: len(re.findall(rf"(?<![\w.%-]){op}\(", text))
              for op in ("convolution", "gather", "scatter", "conditional", "fusion", "custom-call", "copy")}
    counts["instructions"] = len(re.findall(r"^\s+(?:ROOT )?%?[\w.-]+ = ", text, re.M))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "hlo": counts}


def profile(model, caps, xs, networks: dict, rounds: int = 7) -> dict:
    """Where the single-image time of the gathered forward goes, stage by stage (module doc).

    Every function is jitted alone and timed on the inputs it gets inside the gathered
    forward of each image of ``xs``: the median over the images (one call each, after
    warm-up), the best of ``rounds`` such medians, the functions of a table row taking
    turns round by round (on a CPU shared with other jobs the best round is the one least
    disturbed, and a busy spell hits every function of the row alike).  ``networks``
    ({name: jitted f(x)}) are timed the same way, for the stage sums to be read against.  Block pieces are timed on the
    images that stay within the capacities (an image over capacity takes the dense branch);
    ``gathered_nocond`` is the gathered branch alone, one program, no ``lax.cond``.  Each
    separately jitted call also pays the dispatch cost measured as ``dispatch_ms`` (an
    identity function on the block input).
    """
    import jax
    import jax.numpy as jnp

    from jaxroute.decoupling.flops import _active, _block, _bn, _conv, _ctrl_logits

    P, S = jax.tree.map(jnp.asarray, (model.variables["params"], model.variables["batch_stats"]))
    stem, head = (jax.jit(f) for f in _stem_head(model))

    def best(timed: dict) -> dict:
        """{name: (f, [args per image])} -> {name: best-of-rounds median ms}, the functions taking turns."""
        out = {k: float("inf") for k in timed}
        for _ in range(rounds):
            for k, (f, args) in timed.items():
                if args:
                    out[k] = min(out[k], _median_ms(lambda a: jax.block_until_ready(f(*a)), args))
        return {k: (None if v == float("inf") else v) for k, v in out.items()}

    rows = []
    h_in = [stem(x) for x in xs]
    res = {"rounds": rounds, "network_ms": best({k: (f, [(x,) for x in xs]) for k, f in networks.items()}),
           **best({"stem_ms": (stem, [(x,) for x in xs]), "dispatch_ms": (jax.jit(lambda h: h), [(h,) for h in h_in])})}
    for name, pre, stride in _blocks(model):
        p, s = P[name], S[name]
        planes = p["conv1"]["kernel"].shape[-1]
        c1, c2 = caps[f"{pre}.conv1"], caps[f"{pre}.conv2"]

        # the gathered branch of flops._block, piece by piece
        def ctrl1(h, p=p, c1=c1):
            return _active(_ctrl_logits(p["controller1"], h.mean((1, 2)))[0] > 0, c1)

        def gather1(i1, p=p, s=s):
            return (p["conv1"]["kernel"][..., i1], p["bn1"]["scale"][i1], p["bn1"]["bias"][i1], s["bn1"]["mean"][i1],
                    s["bn1"]["var"][i1])

        def conv1(h, w, sc, b, m, v, v1, stride=stride):
            return jax.nn.relu((_conv(h, w, stride) - m) * (sc * jax.lax.rsqrt(v + 1e-5)) + b) * v1

        def ctrl2(h1, i1, p=p, c2=c2):
            return _active(_ctrl_logits(p["controller2"], h1.mean((1, 2)), i1)[0] > 0, c2)

        def gather2(i1, i2, p=p, s=s):
            return (p["conv2"]["kernel"][:, :, i1, :][..., i2], p["bn2"]["scale"][i2], p["bn2"]["bias"][i2],
                    s["bn2"]["mean"][i2], s["bn2"]["var"][i2])

        def conv2(h1, w, sc, b, m, v, v2):
            return ((_conv(h1, w, 1) - m) * (sc * jax.lax.rsqrt(v + 1e-5)) + b) * v2

        def scatter(o, i2, h, planes=planes, stride=stride):
            full = jnp.zeros(o.shape[:3] + (planes,), o.dtype).at[..., i2].add(o)
            return jax.nn.relu(full + _shortcut(h, planes, stride))

        def nocond(h):
            i1, v1 = ctrl1(h)
            h1 = conv1(h, *gather1(i1), v1)
            i2, v2 = ctrl2(h1, i1)
            return scatter(conv2(h1, *gather2(i1, i2), v2), i2, h)

        fns = {k: jax.jit(f) for k, f in (("ctrl1", ctrl1), ("gather1", gather1), ("conv1", conv1), ("ctrl2", ctrl2),
                                          ("gather2", gather2), ("conv2", conv2), ("scatter", scatter),
                                          ("gathered_nocond", nocond))}
        fns["conv1_dense"] = jax.jit(lambda h, p=p, s=s, stride=stride: jax.nn.relu(
            _bn(_conv(h, p["conv1"]["kernel"], stride), p["bn1"], s["bn1"])))
        fns["conv2_dense"] = jax.jit(lambda h, p=p, s=s: _bn(_conv(h, p["conv2"]["kernel"], 1), p["bn2"], s["bn2"]))
        gathered = jax.jit(lambda h, p=p, s=s, stride=stride, c1=c1, c2=c2: _block(h, p, s, stride, (c1, c2)))
        dense = jax.jit(lambda h, p=p, s=s, stride=stride, c=planes: _static_block(h, p, s, stride, c, c))
        static = jax.jit(lambda h, p=p, s=s, stride=stride, c1=c1, c2=c2: _static_block(h, p, s, stride, c1, c2))

        pieces = {k: [] for k in fns}
        h_out = []
        for h in h_in:
            h_out.append(gathered(h)[0])
            z1 = np.asarray(_ctrl_logits(p["controller1"], h.mean((1, 2))))[0] > 0
            if z1.sum() > c1:
                continue  # over capacity: the gathered forward runs this block dense
            i1, v1 = fns["ctrl1"](h)
            g1 = fns["gather1"](i1)
            h1 = fns["conv1"](h, *g1, v1)
            if (np.asarray(_ctrl_logits(p["controller2"], h1.mean((1, 2)), i1))[0] > 0).sum() > c2:
                continue  # conv2 over capacity: it runs with every output filter
            i2, v2 = fns["ctrl2"](h1, i1)
            g2 = fns["gather2"](i1, i2)
            o = fns["conv2"](h1, *g2, v2)
            for k, a in (("ctrl1", (h,)), ("gather1", (i1,)), ("conv1", (h, *g1, v1)), ("ctrl2", (h1, i1)),
                         ("gather2", (i1, i2)), ("conv2", (h1, *g2, v2)), ("scatter", (o, i2, h)),
                         ("gathered_nocond", (h,)), ("conv1_dense", (h,)),
                         ("conv2_dense", (fns["conv1_dense"](h),))):
                pieces[k].append(a)
        whole = [(h,) for h in h_in]
        row = {"block": pre, "caps": [c1, c2], "planes": planes, "within_capacity": len(pieces["ctrl1"]),
               **best({"dense_ms": (dense, whole), "gathered_ms": (gathered, whole), "static_ms": (static, whole),
                       **{f"{k}_ms": (f, pieces[k]) for k, f in fns.items()}})}
        rows.append(row)
        h_in = h_out
    res.update(best({"head_ms": (head, [(h,) for h in h_in])}))
    res["blocks"] = rows
    res["xla"] = {"gathered": _hlo_ops(networks["gathered"], xs[0]),
                  "dense": _hlo_ops(jax.jit(_static_pruned(model, dict(zip(model.spec.names, model.spec.channels)))),
                                    xs[0])}
    return res


def print_profile(prof: dict) -> None:
    """The profile as a table on stdout."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    cols = ("dense", "gathered", "static", "gathered_nocond", "ctrl1", "gather1", "conv1", "conv1_dense", "ctrl2",
            "gather2", "conv2", "conv2_dense", "scatter")
    print(f"profile: ms per call, median over the images, best of {prof['rounds']} rounds; every stage jitted "
          f"alone, each call including the dispatch cost ({prof['dispatch_ms']:.3f} ms)")
    print(f"{'block':9s} {'caps':>9s} " + " ".join(f"{c[:9]:>9s}" for c in cols) + "  n")
    tot = {c: 0.0 for c in cols}
    for r in prof["blocks"]:
        print(f"{r['block']:9s} {r['caps'][0]:>3d},{r['caps'][1]:>2d}/{r['planes']:<2d} "
              + " ".join(f"{f(r[c + '_ms']):>9s}" for c in cols) + f"  {r['within_capacity']}")
        for c in cols:
            tot[c] += r[c + "_ms"] or 0.0
    print(f"{'sum':9s} {'':9s} " + " ".join(f"{tot[c]:9.3f}" for c in cols))
    print(f"stem {prof['stem_ms']:.3f} ms, head {prof['head_ms']:.3f} ms; whole networks (one program each): "
          + ", ".join(f"{k} {v:.3f}" for k, v in prof["network_ms"].items()) + " ms")
    for k, v in prof["xla"].items():
        print(f"XLA {k:8s}: {v['flops'] / 1e6:7.2f} MFLOP, {v['bytes_accessed'] / 2**20:6.2f} MiB accessed; HLO "
              + ", ".join(f"{op} {n}" for op, n in v["hlo"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="a trained decoupled model directory (default: random controllers)")
    ap.add_argument("--backbone", default="../shared/models/cifar10-resnet/resnet20-12fca82f.th")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=256, help="images that set the capacities")
    ap.add_argument("--quick", action="store_true", help="20 images, 32 calibration images")
    ap.add_argument("--out", help="write the result JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="also time every stage of the gathered forward alone (where its time goes)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.calibration = 20, 32

    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.machine import cpu_model
    from jaxroute.data import load_dataset
    from jaxroute.decoupling.flops import capacities, dense_macs, gathered_forward, macs_per_sample
    from jaxroute.decoupling.model import calculation_paths, decoupled_model
    from jaxroute.weights import load_model

    torch.set_num_threads(1)
    if args.weights:
        model = decoupled_model(None, args.weights, key=jax.random.key(0))
    else:
        model = decoupled_model("resnet20", args.backbone, key=jax.random.key(0))
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: (np.asarray(rng.normal(0, 3, v.shape), np.float32)
                          if "fc1" in str(p) and "controller" in str(p) and str(p).endswith("'kernel']") else v),
            model.variables["params"])
        model = model.with_variables({**model.variables, "params": params})
    plain = load_model(model.meta.arch, args.backbone)
    n_total = args.images + args.calibration
    ds = load_dataset(args.data, "test", limit=n_total)
    calib = jnp.asarray(ds.images[: args.calibration])
    xs = [jnp.asarray(ds.images[args.calibration + i: args.calibration + i + 1]) for i in range(args.images)]
    z_cal = calculation_paths(model, calib)
    caps = capacities(z_cal)
    z = calculation_paths(model, jnp.concatenate(xs))
    macs = macs_per_sample(model, z)

    dense = jax.jit(plain.logits)
    masked = jax.jit(model.logits)
    gathered = jax.jit(gathered_forward(model, caps))
    static = jax.jit(_static_pruned(model, caps))
    peer = _torch_slicing(model)
    txs = [torch.from_numpy(np.transpose(np.asarray(x), (0, 3, 1, 2)).copy()) for x in xs]

    err = max(float(np.abs(np.asarray(gathered(x)[0]) - np.asarray(masked(x))).max()) for x in xs[:10])
    err_t = max(float(np.abs(peer(tx).numpy() - np.asarray(masked(x))).max()) for x, tx in zip(xs[:10], txs))
    overflow = int(sum(int(gathered(x)[1]) for x in xs))
    sync = lambda f: (lambda x: jax.block_until_ready(f(x)))  # noqa: E731
    ms = {"dense": _median_ms(sync(dense), xs), "masked": _median_ms(sync(masked), xs),
          "gathered": _median_ms(sync(gathered), xs), "static": _median_ms(sync(static), xs),
          "torch_slicing": _median_ms(peer, txs)}
    xb = jnp.asarray(ds.images[:128]) if len(ds.images) >= 128 else jnp.concatenate([calib] * 4)[:128]
    thr = {}
    for name, f in (("dense", dense), ("masked", masked)):
        jax.block_until_ready(f(xb))
        t = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(f(xb))
        thr[name] = 3 * len(xb) / (time.perf_counter() - t)
    res = {"cpu": cpu_model(), "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None, "images": args.images, "calibration": args.calibration,
           "weights": args.weights or "random controllers", "median_ms_b1": ms,
           "speedup_gathered_vs_dense": ms["dense"] / ms["gathered"],
           "speedup_static_vs_dense": ms["dense"] / ms["static"],
           "throughput_b128_img_s": thr, "macs_dense": dense_macs(model), "macs_mean": float(macs.mean()),
           "mac_ratio": dense_macs(model) / float(macs.mean()), "capacities": caps,
           "overflow_layers": overflow, "max_abs_diff_gathered_vs_masked": err,
           "max_abs_diff_torch_vs_masked": err_t}
    if args.profile:
        res["profile"] = profile(model, caps, xs, {"dense": dense, "masked": masked, "gathered": gathered,
                                                   "static": static})
    text = json.dumps(res, indent=1)
    print(text)
    if args.profile:
        print_profile(res["profile"])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
