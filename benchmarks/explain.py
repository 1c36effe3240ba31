"""Benchmark: saliency maps per second, jaxroute.explain vs Captum, on the same ResNet-20, images and cores.

    python -m benchmarks.explain                       # 100 test images, batches of 20, all six methods
    python -m benchmarks.explain --n 20 --batch 10 --repeats 1 --methods gradient,grad_cam
    python -m benchmarks.explain --gated               # also under per-image class gates
    python -m benchmarks.explain --methods "" --subnet-images 1000   # only the subnet distillation rows

Both libraries explain the SAME images (the first n/10 CIFAR-10 JPEG test
images of every class, ``../shared/data/cifar10-jpeg/test``; synthetic
images and random weights without ``../shared``) for their true labels, on
the same weights (``../shared/models/cifar10-resnet/resnet20-12fca82f.th``):
jaxroute's Flax ResNet-20 and ``tests/torch_reference.GatedReluResNet20``,
which has one ``nn.ReLU`` module per use so that Captum's Deconvolution and
GuidedBackprop hooks reach every ReLU.  Settings are the defaults of both:
IG 50 Gauss-Legendre steps from black, SmoothGrad 50 samples at sigma 0.15,
Grad-CAM at ``layer3.2`` with bilinear upsampling to 32x32.  Both sides
process the images in the same chunks of ``--batch`` images (Captum's IG and
NoiseTunnel expand each chunk by their 50 steps/samples internally, as
jaxroute does).  ``--gated`` adds rows where every image is explained under
its own class's gate vector (random 70 %-dense binary gates per class).

Both sides get the same cores: torch ``--threads`` intra-op threads
(default: all cores); JAX one CPU device per core, each chunk split over
them.  Times: the whole set of n images, median of ``--repeats`` runs; the
JAX compile time separately (excluded).  The column "max |diff| / max |map|"
compares the two libraries' maps (SmoothGrad draws different noise on each
side here, so its row differs by the noise; the tests compare it on shared
noise).

``--subnet-images N`` adds the class-subnetwork distillation
(:func:`jaxroute.routing.subnet.distill_subnets`, the paper's settings, one
epoch) of all ten classes on the first N training images (class-interleaved):
all classes in one compiled program vs the same ten classes one at a time
(``classes=[c]``, one program for the shape of a single class), each timed
after a first run that compiles it (the full network's logits computed once
and given to both).  Output: machine info, markdown tables, one JSON line (last line).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks.inputs import CHECKPOINTS, REPO, cifar_images

CKPT = CHECKPOINTS["resnet20"]
METHOD_NAMES = ("gradient", "deconvnet", "guided_backprop", "grad_cam", "integrated_gradients", "smoothgrad")


def machine_info(threads: int, devices: int) -> dict:
    import captum
    import jax
    import torch

    from benchmarks.machine import cpu_model

    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_devices": f"{len(jax.devices())} x {jax.devices()[0].platform} (chunks split over {devices})",
        "torch": torch.__version__, "torch_threads": threads, "captum": captum.__version__,
        "weights": str(CKPT) if CKPT.exists() else "random (no ../shared)",
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run_jax(model, method, x, y, gates, batch, repeats, devices):
    import jax

    from jaxroute.explain import explain
    from jaxroute.utils.devices import batch_sharding, shard_batch

    sharding = batch_sharding(jax.devices()[:devices])
    key = jax.random.key(0)

    def fn(xb, tb, gb, idx):
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
        return explain(model, gb, xb, tb, method=method, key=keys).maps

    chunks = [tuple(shard_batch(np.asarray(a[i:i + batch]), sharding) if a is not None else None
                    for a in (x, y.astype(np.int32), gates, np.arange(len(x))))
              for i in range(0, len(x), batch)]
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*chunks[0]).compile()
    compile_s = time.perf_counter() - t0
    times, maps = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps = [compiled(*c) for c in chunks]
        maps = np.concatenate(jax.device_get(maps))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s, maps


def flops_per_map(model, method, x, y, gates) -> float:
    """Floating-point operations of one map, from XLA's cost analysis of the compiled program.  IG's
    and SmoothGrad's points run as one batch here because the analysis counts a loop body once; the
    arithmetic is the same either way.  The libraries do the same arithmetic (their maps agree), so
    the count turns both maps/s into arithmetic rates."""
    import jax

    from jaxroute.explain import explain
    from jaxroute.explain.methods import IGConfig, SmoothGradConfig

    config = {"integrated_gradients": IGConfig(batch_steps=IGConfig().steps),
              "smoothgrad": SmoothGradConfig(batch_samples=SmoothGradConfig().samples)}.get(method)
    key = jax.random.split(jax.random.key(0), len(x))
    fn = jax.jit(lambda xb, tb, gb, kb: explain(model, gb, xb, tb, method=method, config=config, key=kb).maps)
    return float(fn.lower(x, y.astype(np.int32), gates, key).compile().cost_analysis()["flops"]) / len(x)


def run_captum(tm, method, x, y, gates, batch, repeats):
    import captum.attr as ca
    import torch

    def one(xb, yb, gb):
        xt = torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2))).requires_grad_(True)
        tt = torch.from_numpy(yb).long()
        args = (None if gb is None else torch.from_numpy(gb),)
        if method == "gradient":
            a = ca.Saliency(tm).attribute(xt, target=tt, abs=False, additional_forward_args=args)
        elif method == "deconvnet":
            a = ca.Deconvolution(tm).attribute(xt, target=tt, additional_forward_args=args)
        elif method == "guided_backprop":
            a = ca.GuidedBackprop(tm).attribute(xt, target=tt, additional_forward_args=args)
        elif method == "integrated_gradients":
            a = ca.IntegratedGradients(tm).attribute(xt, target=tt, additional_forward_args=args)
        elif method == "smoothgrad":
            a = ca.NoiseTunnel(ca.Saliency(tm)).attribute(xt, nt_type="smoothgrad", nt_samples=50, stdevs=0.15,
                                                          target=tt, abs=False, additional_forward_args=args)
        else:
            cam = ca.LayerGradCam(tm, tm.layer3[2].gate_out).attribute(xt, target=tt, relu_attributions=True,
                                                                       additional_forward_args=args)
            return ca.LayerAttribution.interpolate(cam, (32, 32), interpolate_mode="bilinear")[:, 0].detach().numpy()
        return a.detach().abs().amax(1).numpy()

    times, maps = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps = np.concatenate([one(x[i:i + batch], y[i:i + batch], None if gates is None else gates[i:i + batch])
                               for i in range(0, len(x), batch)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), maps


def run_subnets(model, n: int, repeats: int) -> dict:
    """Seconds of one distillation epoch of all ten classes: one program vs one class at a time."""
    from jaxroute.routing.subnet import SubnetConfig, distill_subnets, full_logits

    x, y, _ = cifar_images(n, "train")
    logits = full_logits(model, x)
    cfg = SubnetConfig(epochs=1)

    def together():
        return distill_subnets(model, x, y, config=cfg, logits=logits).gates

    def one_by_one():
        return np.concatenate([distill_subnets(model, x, y, config=cfg, logits=logits, classes=[c]).gates
                               for c in range(model.num_classes)])

    row = {"images": n, "classes": model.num_classes, "epochs": 1}
    gates = {}
    for name, fn in (("one_program", together), ("one_class_at_a_time", one_by_one)):
        t0 = time.perf_counter()
        gates[name] = fn()                # compiles
        row[f"{name}_first_s"] = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        row[f"{name}_s"] = statistics.median(times)
    row["max_gate_diff"] = float(np.abs(gates["one_program"] - gates["one_class_at_a_time"]).max())
    row["ratio"] = row["one_class_at_a_time_s"] / row["one_program_s"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="number of test images (default 100)")
    ap.add_argument("--batch", type=int, default=20, help="images per chunk, both libraries (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--devices", type=int, default=None, help="JAX CPU devices (default: one per core)")
    ap.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated subset")
    ap.add_argument("--gated", action="store_true", help="also explain under per-image class gates")
    ap.add_argument("--subnet-images", type=int, default=0,
                    help="also time one subnet-distillation epoch on this many training images (default: skip)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if (any(m not in METHOD_NAMES for m in methods) or args.n < 1 or args.batch < 1 or args.n % args.batch
            or args.subnet_images < 0):
        print(f"--methods must be of {METHOD_NAMES}; --batch must divide --n; --subnet-images must be >= 0",
              file=sys.stderr)
        return 2

    import jax

    from jaxroute.utils.devices import cpu_devices_per_core

    cpu_devices_per_core()
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import torch_reference

    from jaxroute.weights import load_model

    devices = args.devices or len(jax.devices())
    if devices > len(jax.devices()) or args.batch % devices:
        print(f"--devices {devices}: need <= {len(jax.devices())} devices dividing --batch", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, devices)
    print("## machine")
    for k, v in info.items():
        print(f"- {k}: {v}")

    x, y, _ = cifar_images(args.n)
    if CKPT.exists():
        model = load_model("resnet20", CKPT)
        tm = torch_reference.GatedReluResNet20(model.spec.names, model.spec.channels)
        from jaxroute.weights import load_torch_state_dict

        tm.load_state_dict({k: torch.as_tensor(v) for k, v in load_torch_state_dict(CKPT).items()}, strict=True)
    else:
        from jaxroute.weights import abstract_variables, torch_to_flax

        model = load_model("resnet20", key=jax.random.key(0))
        tm = torch_reference.randomize_(torch_reference.GatedReluResNet20(model.spec.names, model.spec.channels))
        model = model.with_variables(torch_to_flax(tm.state_dict(), abstract_variables(model.module, (32, 32, 3))))
    tm = tm.eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    class_gates = (rng.random((10, model.spec.size)) < 0.7).astype(np.float32)
    print(f"\n{len(x)} images, chunks of {args.batch}; torch threads {args.threads}, JAX devices {devices}\n")

    rows = []
    for gated in ([False, True] if args.gated else [False]):
        gates = class_gates[y] if gated else None
        for m in methods:
            tj, cj, mj = run_jax(model, m, x, y, gates, args.batch, args.repeats, devices)
            tc, mc = run_captum(tm, m, x, y, gates, args.batch, args.repeats)
            diff = float(np.abs(mj - mc).max() / max(np.abs(mc).max(), 1e-30))
            flops = flops_per_map(model, m, x[:args.batch], y[:args.batch],
                                  None if gates is None else gates[:args.batch])
            row = {"method": m, "gated": gated, "jax_s": tj, "jax_compile_s": cj, "captum_s": tc,
                   "jax_maps_per_s": len(x) / tj, "captum_maps_per_s": len(x) / tc, "ratio": tc / tj,
                   "max_rel_diff": diff, "mflop_per_map": flops / 1e6,
                   "jax_gflop_per_s": flops * len(x) / tj / 1e9, "captum_gflop_per_s": flops * len(x) / tc / 1e9}
            rows.append(row)
            print(f"[{m}{' gated' if gated else ''}] {row}", file=sys.stderr, flush=True)

    if rows:
        print("| method | weights | jaxroute maps/s (compile s) | Captum maps/s | jaxroute / Captum | MFLOP per map "
              "| GFLOP/s jaxroute, Captum | max |diff| / max |map| |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {'class gates' if r['gated'] else 'full'} | {r['jax_maps_per_s']:.1f} "
                  f"({r['jax_compile_s']:.1f}) | {r['captum_maps_per_s']:.1f} | {r['ratio']:.2f}× | "
                  f"{r['mflop_per_map']:.1f} | {r['jax_gflop_per_s']:.1f}, {r['captum_gflop_per_s']:.1f} | "
                  f"{r['max_rel_diff']:.1e} |")
        print(f"\nTimes for all {len(x)} images, median of {args.repeats} runs, JAX compile excluded. FLOP per map: "
              "XLA's cost analysis of jaxroute's compiled program (the same arithmetic in both libraries).")
    subnets = None
    if args.subnet_images:
        subnets = run_subnets(model, args.subnet_images, args.repeats)
        print(f"\n| subnet distillation, 1 epoch, {subnets['images']} training images | seconds (first run, with "
              "compile) | ratio |\n|---|---:|---:|")
        print(f"| all {subnets['classes']} classes in one program | {subnets['one_program_s']:.1f} "
              f"({subnets['one_program_first_s']:.1f}) | 1.00× |")
        print(f"| one class at a time | {subnets['one_class_at_a_time_s']:.1f} "
              f"({subnets['one_class_at_a_time_first_s']:.1f}) | {subnets['ratio']:.2f}× |")
        print(f"\nMedian of {args.repeats} runs after the first; max |gate difference| between the two "
              f"{subnets['max_gate_diff']:.1e}.")
    print(f"Load average at the end {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}.")
    print(json.dumps({"benchmark": "explain", "n": len(x), "batch": args.batch, "machine": info, "rows": rows,
                      "subnets": subnets}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
