"""Benchmark: is a routing job input-bound?  Decode + preprocess rate vs resnet18 DGR routing rate.

    python -m benchmarks.input_pipeline --quick      # smoke test, about a minute on 2 cores
    python -m benchmarks.input_pipeline              # 1,000 images; RSS at 1,000 and 10,000 images

One run measures, on the same machine:

* decode + preprocess: mixed-size JPEGs (sides drawn uniformly in
  ``--min-side``..``--max-side``; CIFAR-10 test images upscaled when
  ``../shared`` is there, smooth synthetic images otherwise) through the
  ImageNet evaluation transform (shorter side 256, bilinear antialiased,
  centre crop 224) on grain's decode pipeline (:mod:`jaxroute.data.pipeline`)
  with 1 and 2 (``--workers``) worker processes: images/s after the first
  batch (steady) and including the workers' start;
* routing: ``route_outputs(resnet18, "dgr", DGRConfig(steps=T))`` (randomly
  initialised; weights do not change the work) on 224 x 224 batches,
  images/s after compilation, in its own process;
* memory: the extraction job (:func:`jaxroute.extraction.run_extraction`, a
  per-sample mean as its function, so that input dominates) streaming
  ``--rss-counts`` images, each count in its own process: peak RSS of the job
  process and of the largest decode worker.  Flat = the same at 1,000 and
  10,000.  The larger folders hard-link a pool of distinct files, so the
  decode work per image is the same.

A job is input-bound when the decode rate of the workers it has is below the
routing rate; the workers a device needs = routing rate / decode rate of one
worker (rounded up).  The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "test"
RESULT_TAG = "@@RESULT "


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_pool(folder: Path, n: int, min_side: int, max_side: int, seed: int = 0) -> list[Path]:
    """``n`` distinct mixed-size JPEGs (quality 90) in folder/pool/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = folder / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    srcs = sorted(CIFAR_TEST.glob("*/*.jpg"))[: n] if CIFAR_TEST.is_dir() else []
    out = []
    for i in range(n):
        if srcs:
            with Image.open(srcs[i % len(srcs)]) as im:
                base = im.convert("RGB")
        else:
            a = np.kron(rng.uniform(0, 255, (4, 4, 3)), np.ones((8, 8, 1))) + rng.normal(0, 12, (32, 32, 3))
            base = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        p = pool / f"{i:05d}.jpg"
        base.resize((w, h), Image.Resampling.BICUBIC).save(p, quality=90)
        out.append(p)
    return out


def make_folder(root: Path, pool: list[Path], n: int) -> Path:
    """ROOT/test/<class>/ with ``n`` files hard-linked (symlinked if linking fails) from the pool, 10 classes."""
    for i in range(n):
        d = root / "test" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        dst = d / f"{i:06d}.jpg"
        try:
            os.link(pool[i % len(pool)], dst)
        except OSError:
            dst.symlink_to(pool[i % len(pool)])
    return root


def decode_rate(folder: Path, workers: int, batch: int) -> dict:
    from jaxroute.data.imagefolder import stream_imagefolder
    from jaxroute.data.preprocess import Preprocess

    ds = stream_imagefolder(folder, "test", Preprocess(256, 224), workers=workers)
    n = len(ds)
    t0 = time.perf_counter()
    it = ds.images.iter_ranges([(0, n)], batch)
    first = next(it)
    t1 = time.perf_counter()
    rest = sum(len(x) for x in it)
    t2 = time.perf_counter()
    return {"workers": workers, "images": n, "batch": batch, "first_batch_s": t1 - t0,
            "steady_images_per_s": rest / (t2 - t1) if rest else None,
            "total_images_per_s": (len(first) + rest) / (t2 - t0)}


def worker_route(cfg: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxroute.routing import DGRConfig, route_outputs
    from jaxroute.weights import load_model

    model = load_model("resnet18", key=jax.random.key(0))
    fn = jax.jit(route_outputs(model, "dgr", DGRConfig(steps=cfg["steps"])))
    x = jax.random.uniform(jax.random.key(1), (cfg["batch"], 224, 224, 3), jnp.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, None, None))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        jax.block_until_ready(fn(x, None, None))
        times.append(time.perf_counter() - t)
    s = float(np.median(times))
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "steps": cfg["steps"],
            "batch": cfg["batch"], "compile_and_first_s": compile_s, "images_per_s": cfg["batch"] / s,
            "peak_rss_mib": peak_rss_mib()}


def worker_rss(cfg: dict) -> dict:
    import resource

    import jax

    from jaxroute.data.imagefolder import stream_imagefolder
    from jaxroute.data.preprocess import Preprocess
    from jaxroute.extraction import plan_batches, run_extraction

    ds = stream_imagefolder(cfg["folder"], "test", Preprocess(256, 224), workers=cfg["workers"])
    plan = plan_batches(len(ds), cfg["batch"], cfg["shard"])
    fn = jax.jit(lambda x, y, i: {"mean": x.mean(axis=(1, 2, 3))})
    t0 = time.perf_counter()
    res = run_extraction(fn, ds, cfg["out"], job={"bench": "rss"}, plan=plan, progress=False)
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": len(ds), "seconds": time.perf_counter() - t0, "input_images_per_s": res.input_per_s,
            "job_peak_rss_mib": peak_rss_mib(), "largest_worker_peak_rss_mib": worker_peak}


def spawn(kind: str, cfg: dict, timeout: float = 3600) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", "--worker", kind, json.dumps(cfg)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"{kind} worker failed (exit {p.returncode}): {p.stderr[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--images", type=int, default=1000, help="images in the decode-rate folder")
    ap.add_argument("--pool", type=int, default=500, help="distinct files (the rest are hard links)")
    ap.add_argument("--min-side", type=int, default=48)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--batch", type=int, default=32, help="images per decode batch and per routing call")
    ap.add_argument("--steps", type=int, default=30, help="DGR steps T of the routing rate")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-counts", default="1000,10000")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, cfg = args.worker[0], json.loads(args.worker[1])
        res = {"route": worker_route, "rss": worker_rss}[kind](cfg)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    if args.quick:
        args.images, args.pool, args.batch, args.steps, args.repeats = 64, 32, 8, 2, 1
        args.rss_counts = "64,256"
    from benchmarks.machine import cpu_model

    workers = [int(w) for w in args.workers.split(",")]
    counts = [int(c) for c in args.rss_counts.split(",")]
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
              "images": {"min_side": args.min_side, "max_side": args.max_side, "pool": args.pool,
                         "source": "cifar10-jpeg upscaled" if CIFAR_TEST.is_dir() else "synthetic"}}
    with tempfile.TemporaryDirectory(prefix="jaxroute-input-bench-") as tmp:
        tmp = Path(tmp)
        pool = make_pool(tmp, min(args.pool, args.images), args.min_side, args.max_side)
        folder = make_folder(tmp / "decode", pool, args.images)
        result["decode"] = [decode_rate(folder, w, args.batch) for w in workers]
        for r in result["decode"]:
            print(f"decode+preprocess to 224x224, {r['workers']} worker(s): {r['steady_images_per_s']:.1f} images/s "
                  f"steady, {r['total_images_per_s']:.1f} with start-up ({r['images']} images)", flush=True)
        result["route"] = spawn("route", {"steps": args.steps, "batch": args.batch, "repeats": args.repeats})
        r = result["route"]
        print(f"resnet18 DGR (T={r['steps']}, batch {r['batch']}, {r['backend']}): {r['images_per_s']:.2f} images/s",
              flush=True)
        result["rss"] = []
        for c in counts:
            f = make_folder(tmp / f"rss-{c}", pool, c)
            rr = spawn("rss", {"folder": str(f), "workers": 1, "batch": args.batch, "shard": 256,
                               "out": str(tmp / f"out-{c}")})
            result["rss"].append(rr)
            print(f"job over {c} images: peak RSS {rr['job_peak_rss_mib']:.0f} MiB (job), "
                  f"{rr['largest_worker_peak_rss_mib']:.0f} MiB (largest decode worker)", flush=True)
    one = next((d["steady_images_per_s"] for d in result["decode"] if d["workers"] == 1), None)
    if one:
        need = r["images_per_s"] / one
        result["workers_needed"] = math.ceil(need)
        print(f"routing needs {need:.2f} decode workers' worth of input on this machine "
              f"({'input-bound with 1 worker' if need > 1 else 'compute-bound with 1 worker'})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
