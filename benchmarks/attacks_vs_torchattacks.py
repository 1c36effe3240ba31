"""Benchmark: jaxroute.attacks vs torchattacks on the pretrained CIFAR-10 ResNet-20.

    python -m benchmarks.attacks_vs_torchattacks            # 500 test images
    python -m benchmarks.attacks_vs_torchattacks --n 100 --repeats 1 --only fgsm,bim
    python -m benchmarks.attacks_vs_torchattacks --devices 1  # JAX on one CPU device

Both libraries attack the SAME images (the first n/10 CIFAR-10 JPEG test
images of every class, ``../shared/data/cifar10-jpeg/test``) with the true
labels, on the same weights (``../shared/models/cifar10-resnet/
resnet20-12fca82f.th``): jaxroute's Flax ResNet-20 and the PyTorch
ResNet-20 of ``benchmarks/torch_dgr.py`` (option A) behind its normalization
(``PixelSpace``).  Per attack it
reports the success rate over all n images (prediction != true label;
images the model already gets wrong count as successes with a zero
perturbation, in both libraries), the median L2 and L∞ perturbation over
the images that were classified correctly and are fooled,
and the time for the whole batch: the median over ``--repeats`` runs; for
JAX the compile time separately (``jit(...).lower(...).compile()``) and
excluded from the run time.  torchattacks' DeepFool runs images one by one
in Python and its CW at a fixed c, so those rows run ``--slow-repeats``
times (both libraries).  Rows marked "jaxroute only" have no torchattacks
counterpart.

Both sides get the same cores: torch ``--threads`` intra-op threads (default:
all cores); JAX one CPU device per core (``jaxroute.utils.devices``,
``--devices``), the batch split over them with ``shard_batch``.  For the
rows whose images are deterministic functions of the same gradients (FGSM,
BIM, I-FGSM) the column "values differing" gives the share of the n·32·32·3
pixel values of the two libraries' adversarial images that differ by more
than 1e-6 (gradient-sign flips from float rounding; they compound over
iterations, see ``tests/test_attacks.py::test_bim_matches_torchattacks``).

The attack settings of each row are matched (see ``ROWS``).  Output:
machine info, a markdown table, and one JSON line (last line).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from benchmarks.inputs import CHECKPOINTS, CIFAR_JPEG, cifar_images

CKPT = CHECKPOINTS["resnet20"]
DATA_DIR = CIFAR_JPEG / "test"   # the benchmark compares attack results: it needs the real images


# name, label, jaxroute (attack name, config), torchattacks (class name, kwargs) or None, slow
ROWS = [
    ("fgsm", "FGSM ε=8/255", ("fgsm", dict(eps=8 / 255)), ("FGSM", dict(eps=8 / 255)), False),
    ("bim", "BIM ε=8/255 α=2/255 T=10 (torchattacks semantics)",
     ("bim", dict(eps=8 / 255, alpha=2 / 255, steps=10)), ("BIM", dict(eps=8 / 255, alpha=2 / 255, steps=10)), False),
    ("ifgsm_dgr", "I-FGSM DGR Eq. 6 ε=0.01 T=10 (torch: BIM ε=0.1 α=0.01)",
     ("bim", dict(eps=0.01, steps=10)), ("BIM", dict(eps=0.1, alpha=0.01, steps=10)), False),
    ("pgd", "PGD-L∞ ε=8/255 α=2/255 T=10, random start",
     ("pgd", dict(eps=8 / 255, alpha=2 / 255, steps=10)), ("PGD", dict(eps=8 / 255, alpha=2 / 255, steps=10)), False),
    ("pgdl2", "PGD-L2 ε=0.5 α=0.1 T=10, random start",
     ("pgd", dict(norm="l2", eps=0.5, alpha=0.1, steps=10)), ("PGDL2", dict(eps=0.5, alpha=0.1, steps=10)), False),
    ("deepfool", "DeepFool overshoot 0.02, ≤50 it. (torchattacks update)",
     ("deepfool", dict(update="torchattacks")), ("DeepFool", dict(steps=50, overshoot=0.02)), True),
    ("deepfool_orig", "DeepFool, original update (jaxroute only)", ("deepfool", dict()), None, False),
    ("cw", "CW-L2 c=1 κ=0 Adam lr 0.01, 100 steps, no binary search",
     ("cw", dict(initial_c=1.0, binary_search_steps=1, steps=100, abort_early=True)),
     ("CW", dict(c=1, kappa=0, steps=100, lr=0.01)), True),
    ("cw_bs", "CW-L2 5 binary-search rounds × 100 steps, c0=0.01 (jaxroute only)", ("cw", dict()), None, True),
]


def machine_info(threads: int, devices: int) -> dict:
    import jax
    import torch

    from benchmarks.machine import cpu_model

    cpu = cpu_model()
    try:
        import torchattacks
        ta_version = torchattacks.__version__
    except Exception as e:  # pragma: no cover
        ta_version = f"unavailable ({e})"
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_devices": f"{len(jax.devices())} x {jax.devices()[0].platform} (batch split over {devices})",
        "torch": torch.__version__,
        "torch_threads": threads, "torchattacks": ta_version,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def summarize(success: np.ndarray, l2: np.ndarray, linf: np.ndarray, correct: np.ndarray) -> dict:
    """Success rate over all images; median norms over the images that were classified
    correctly and are fooled (clean errors are 'successes' with a zero perturbation)."""
    s = np.asarray(success, bool)
    m = s & correct
    med = (lambda v: float(np.median(v[m]))) if m.any() else (lambda v: float("nan"))
    return {"success": float(s.mean()), "median_l2": med(np.asarray(l2)), "median_linf": med(np.asarray(linf)),
            "fooled_correct": int(m.sum())}


def run_jax(f, name, cfg, x, y, repeats, devices, correct):
    import jax
    from jaxroute import attacks
    from jaxroute.utils.devices import batch_sharding, shard_batch

    fn, cls = attacks.ATTACKS[name]
    core = functools.partial(fn, f, config=cls(**cfg))
    sharding = batch_sharding(jax.devices()[:devices])
    xj = shard_batch(x, sharding)
    yj = shard_batch(np.asarray(y, np.int32), sharding)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jax.jit(core).lower(xj, label=yj, key=key).compile()
    compile_s = time.perf_counter() - t0
    times, res = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = jax.block_until_ready(compiled(xj, label=yj, key=key))
        times.append(time.perf_counter() - t0)
    out = summarize(np.asarray(res.success), np.asarray(res.l2), np.asarray(res.linf), correct)
    out.update(time_s=statistics.median(times), compile_s=compile_s, repeats=repeats)
    return out, np.asarray(res.adv)


def run_torch(model, cls_name, kw, x, y, repeats, correct):
    import torch
    import torchattacks

    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y).long()
    atk = getattr(torchattacks, cls_name)(model, **kw)
    times, adv = [], None
    for r in range(repeats):
        torch.manual_seed(r)
        t0 = time.perf_counter()
        adv = atk(xt, yt)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        pred = model(adv).argmax(1).numpy()
    d = (adv.numpy().transpose(0, 2, 3, 1) - x).reshape(len(x), -1)
    out = summarize(pred != y, np.linalg.norm(d, axis=1), np.abs(d).max(1), correct)
    out.update(time_s=statistics.median(times), repeats=repeats)
    return out, adv.numpy().transpose(0, 2, 3, 1)


def fmt(v, spec=".3f"):
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="number of test images (default 500)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per attack (median reported)")
    ap.add_argument("--slow-repeats", type=int, default=1,
                    help="timed runs of the slow rows (DeepFool, CW; both libraries)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--devices", type=int, default=None,
                    help="JAX CPU devices to split the batch over (default: one per core; n must divide)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {[r[0] for r in ROWS]}")
    args = ap.parse_args(argv)
    if not CKPT.exists() or not DATA_DIR.is_dir():
        print(f"needs {CKPT} and {DATA_DIR}", file=sys.stderr)
        return 2

    import jax

    from jaxroute.utils.devices import cpu_devices_per_core

    cpu_devices_per_core()
    import torch

    from benchmarks.torch_dgr import PixelSpace, build_model
    from jaxroute.weights import load_model

    devices = args.devices or len(jax.devices())
    if devices > len(jax.devices()) or args.n % devices:
        print(f"--devices {devices}: need <= {len(jax.devices())} devices dividing n={args.n}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads, devices)
    print("## machine")
    for k, v in info.items():
        print(f"- {k}: {v}")

    x, y, _ = cifar_images(args.n)
    f = load_model("resnet20", CKPT).logits
    tm = PixelSpace(build_model(20, checkpoint=CKPT)).eval()
    with torch.no_grad():
        correct_t = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).argmax(1).numpy() == y
    correct_j = np.asarray(jax.jit(f)(x)).argmax(1) == y
    acc_t, acc_j = float(correct_t.mean()), float(correct_j.mean())
    print(f"\n{len(x)} images; clean accuracy jaxroute {acc_j:.3f}, torch {acc_t:.3f}\n")

    only = {s for s in args.only.split(",") if s}
    rows = []
    for key, label, (jname, jcfg), tspec, slow in ROWS:
        if only and key not in only:
            continue
        reps = args.slow_repeats if slow else args.repeats
        j, adv_j = run_jax(f, jname, jcfg, x, y, reps, devices, correct_j)
        t = None
        if tspec is not None:
            t, adv_t = run_torch(tm, tspec[0], tspec[1], x, y, reps, correct_t)
            if key in ("fgsm", "bim", "ifgsm_dgr"):
                t["values_differing"] = float(np.mean(np.abs(adv_j - adv_t) > 1e-6))
        rows.append({"attack": key, "label": label, "jaxroute": j, "torchattacks": t})
        print(f"[{key}] jaxroute {j}  torchattacks {t}", file=sys.stderr, flush=True)

    print("| attack | success jaxroute | success torchattacks | median L2 jaxroute | median L2 torchattacks "
          "| median L∞ jaxroute | median L∞ torchattacks | time jaxroute s (compile s) | time torchattacks s "
          "| speed-up | values differing |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        j, t = r["jaxroute"], r["torchattacks"] or {}
        sp = t.get("time_s") / j["time_s"] if t else None
        print(f"| {r['label']} | {fmt(j['success'])} | {fmt(t.get('success'))} | {fmt(j['median_l2'], '.4f')} "
              f"| {fmt(t.get('median_l2'), '.4f')} | {fmt(j['median_linf'], '.4f')} | "
              f"{fmt(t.get('median_linf'), '.4f')} | {j['time_s']:.2f} ({j['compile_s']:.1f}) | "
              f"{fmt(t.get('time_s'), '.2f')} | {fmt(sp, '.1f')}{'×' if sp else ''} | "
              f"{fmt(t.get('values_differing'), '.2e')} |")
    print(f"\nSuccess = prediction != true label, over all {len(x)} images (clean errors count, with a zero "
          f"perturbation); medians over the images classified correctly and fooled; times for the whole "
          f"batch of {len(x)}, median of {args.repeats} runs "
          f"({args.slow_repeats} for the DeepFool and CW rows); JAX compile time excluded and shown in "
          f"parentheses; torch threads {args.threads}, JAX devices {devices}; load average at the end "
          f"{os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}.")
    print(json.dumps({"benchmark": "attacks_vs_torchattacks", "n": len(x), "clean_acc_jax": acc_j,
                      "clean_acc_torch": acc_t, "machine": info, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
