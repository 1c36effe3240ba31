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


def _static_pruned(model, caps):
    """Plain forward with every controlled conv cut to its first ``caps`` filters."""
    import jax
    import jax.numpy as jnp

    from jaxroute.decoupling.flops import _bn, _conv

    P, S = model.variables["params"], model.variables["batch_stats"]
    n = (int(model.meta.arch[6:]) - 2) // 6
    mean, std = jnp.asarray(model.meta.mean), jnp.asarray(model.meta.std)

    def f(x):
        h = jax.nn.relu(_bn(_conv((x - mean) / std, P["conv1"]["kernel"], 1), P["bn1"], S["bn1"]))
        for st in range(1, 4):
            for b in range(n):
                p, s, pre = P[f"layer{st}_{b}"], S[f"layer{st}_{b}"], f"layer{st}.{b}"
                c1, c2 = caps[f"{pre}.conv1"], caps[f"{pre}.conv2"]
                planes = p["conv1"]["kernel"].shape[-1]
                stride = 2 if (st > 1 and b == 0) else 1
                i1, i2 = np.arange(c1), np.arange(c2)
                o = jax.nn.relu(_bn(_conv(h, p["conv1"]["kernel"][..., :c1], stride), p["bn1"], s["bn1"], i1))
                o = _bn(_conv(o, p["conv2"]["kernel"][:, :, :c1, :c2], 1), p["bn2"], s["bn2"], i2)
                o = jnp.pad(o, ((0, 0), (0, 0), (0, 0), (0, planes - c2)))
                sc = h
                if stride != 1 or h.shape[-1] != planes:
                    q = planes // 4
                    sc = jnp.pad(h[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (q, q)))
                h = jax.nn.relu(o + sc)
        return h.mean((1, 2)) @ P["linear"]["kernel"] + P["linear"]["bias"]

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="a trained decoupled model directory (default: random controllers)")
    ap.add_argument("--backbone", default="../shared/models/cifar10-resnet/resnet20-12fca82f.th")
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--calibration", type=int, default=256, help="images that set the capacities")
    ap.add_argument("--quick", action="store_true", help="20 images, 32 calibration images")
    ap.add_argument("--out", help="write the result JSON here")
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
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
