"""Benchmark: DGR routing throughput of jaxroute vs PyTorch peers.

    python -m benchmarks.routing                 # full run (tens of minutes on 2 CPU cores)
    python -m benchmarks.routing --quick         # smoke test, about 2 minutes
    python -m benchmarks.routing --models resnet20,resnet56 --batch-sizes 32,64,128,256 \\
        --repeats 3 --devices 1,2,4 --json-out routing.json

One run measures, on the SAME inputs (CIFAR-10 JPEG test images from
``../shared/data/cifar10-jpeg/test``, a class-interleaved pool):

* jaxroute DGR (``route_outputs(model, "dgr", DGRConfig(steps=T))``) at several
  batch sizes and at batch 1: compile time separately, the first call
  separately, then the median over ``--repeats`` steady-state calls;
* the official release's way (``benchmarks.torch_dgr.dgr_official``): one
  image at a time in a PyTorch loop;
* a batched PyTorch DGR (``benchmarks.torch_dgr.dgr_batched``), the
  strongest peer we could write;
* jaxroute over 1, 2, 4 JAX devices (forced host devices on a CPU), the
  global batch split over them with ``jax.sharding``;
* achieved GFLOP/s against a matmul peak measured in the same run, peak
  process RSS (every configuration runs in its own subprocess, so the peaks
  are separable) and, on a GPU, JAX's peak device memory;
* a correctness cross-check: batched PyTorch and jaxroute gates on 4 images
  with T=5 agree (max abs diff printed).

The second model (default ``resnet56``) is randomly initialised: weights do
not change the amount of work, only the routes.  The output is machine info,
markdown tables and, as its last line, one JSON object.  See
``benchmarks/README.md`` for what every row means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.inputs import CHECKPOINTS, REPO, cifar_images
RESULT_TAG = "@@RESULT "
QUICK = dict(batch_sizes="4,16", other_batch_sizes="4", n_images=16, repeats=1, official_images=2,
             devices="1,2", scaling_batch=16, step_batch=16, matmul_repeats=3, ablation_batch=8,
             job_images="32,64", job_batch=8)


# --------------------------------------------------------------------------
# small helpers (used by the parent and the workers)
# --------------------------------------------------------------------------

def rss_now_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_peak_mib() -> float:
    """Peak RSS of this process.  VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over an exec, so a worker would inherit the (larger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def median(xs) -> float:
    return float(np.median(np.asarray(xs, float))) if len(xs) else float("nan")


def is_cifar_resnet(name: str) -> bool:
    return name.startswith("resnet") and name[6:].isdigit() and (int(name[6:]) - 2) % 6 == 0 \
        and int(name[6:]) < 100


def resnet_cifar_macs(depth: int, hw: int = 32, num_classes: int = 10) -> list[tuple[str, int]]:
    """Multiply-accumulates of every conv / linear layer of a CIFAR ResNet, forward order.

    A 3x3 conv producing (Ho, Wo, Co) from Ci channels costs Ho*Wo*Co*Ci*9 MACs
    (padding taps included, as a dense implementation computes them).
    BN, ReLU, the option-A shortcut, gates and pooling are not counted.
    """
    n = (depth - 2) // 6
    layers = [("conv1", hw * hw * 16 * 3 * 9)]
    cin, size = 16, hw
    for s, planes in enumerate((16, 32, 64), start=1):
        for b in range(n):
            stride = 2 if (s > 1 and b == 0) else 1
            size_out = size // stride
            layers.append((f"layer{s}.{b}.conv1", size_out * size_out * planes * cin * 9))
            layers.append((f"layer{s}.{b}.conv2", size_out * size_out * planes * planes * 9))
            cin, size = planes, size_out
    layers.append(("linear", 64 * num_classes))
    return layers


def flop_model(name: str, fwd_cost_analysis: float | None = None) -> dict:
    """Forward and gate-backward FLOPs of one image (2 * MACs).

    bwd_input: the backward pass w.r.t. the gates needs the gradient w.r.t.
    the input of every conv/linear layer except the stem conv (whose input is
    the image), each costing as many MACs as its forward; weight gradients
    are not computed.
    """
    if is_cifar_resnet(name):
        layers = resnet_cifar_macs(int(name[6:]))
        fwd = 2 * sum(m for _, m in layers)
        bwd = fwd - 2 * layers[0][1]
        return {"source": "analytic", "fwd": fwd, "bwd_input": bwd, "layers": layers}
    if fwd_cost_analysis:
        return {"source": "XLA cost_analysis (bwd_input ~ fwd)", "fwd": fwd_cost_analysis,
                "bwd_input": fwd_cost_analysis, "layers": []}
    return {"source": "unknown", "fwd": float("nan"), "bwd_input": float("nan"), "layers": []}


def dgr_flops_per_image(fm: dict, steps: int, official: bool) -> float:
    """jaxroute / batched torch: (T-1)*(fwd+bwd) + 2*fwd; official loop: T*(fwd+bwd) + fwd."""
    f, b = fm["fwd"], fm["bwd_input"]
    return steps * (f + b) + f if official else (steps - 1) * (f + b) + 2 * f


# --------------------------------------------------------------------------
# inputs and weights, prepared once by the parent and shared with workers
# --------------------------------------------------------------------------

def prepare_weights(name: str, out: Path) -> dict:
    """Flax variables of ``name`` saved flat to ``out`` (npz); returns a description."""
    import jax

    from benchmarks.torch_dgr import flatten_variables
    from jaxroute.weights.loader import load_model

    ckpt = CHECKPOINTS.get(name)
    if ckpt is not None and ckpt.is_file():
        loaded, source = load_model(name, str(ckpt)), f"pretrained {ckpt.name}"
    else:
        if ckpt is not None:
            print(f"WARNING: {ckpt} not found: {name} is randomly initialised", flush=True)
        loaded, source = load_model(name, key=jax.random.key(0)), "random init (key 0; weights do not affect speed)"
    np.savez(out, **flatten_variables(jax.device_get(loaded.variables)))
    return {"name": name, "weights": source, "checkpoint": str(ckpt) if source.startswith("pretrained") else None,
            "gates": loaded.spec.size, "gate_points": len(loaded.spec)}


def load_variables(path) -> dict:
    nested: dict = {}
    with np.load(path) as z:
        for key in z.files:
            *parents, leaf = key.split("/")
            d = nested
            for p in parents:
                d = d.setdefault(p, {})
            d[leaf] = z[key]
    return nested


# --------------------------------------------------------------------------
# workers (each configuration runs in its own process)
# --------------------------------------------------------------------------

def _jax_loaded(cfg):
    from jaxroute.models import GatedModel, create_model, default_meta

    name = cfg["model"]
    return GatedModel(create_model(name), load_variables(cfg["weights"]), default_meta(name))


def _pool(cfg):
    return np.load(cfg["pool"])


def _batches(pool: np.ndarray, b: int, count: int) -> list[np.ndarray]:
    """``count`` batches of ``b`` images, cycling through the pool."""
    n = len(pool)
    return [pool[(np.arange(b) + k * b) % n] for k in range(count)]


def _device_memory(jax) -> dict:
    out = {}
    for d in jax.local_devices():
        if d.platform != "cpu":
            try:
                st = d.memory_stats() or {}
                out[str(d)] = st.get("peak_bytes_in_use")
            except Exception:  # noqa: BLE001 - not every backend has memory_stats
                pass
    return out


CROSSCHECK_TOL = 1e-6  # float64 gates after T steps (see worker_crosscheck)


def run_times(fn, reps: int) -> list[float]:
    """Seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def worker_matmul(cfg) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(cfg["threads"])
    n, reps = cfg["n"], cfg["repeats"]
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)

    dot = jax.jit(jnp.dot)
    ja, jb = jax.device_put(a), jax.device_put(b)
    tj = run_times(lambda: dot(ja, jb).block_until_ready(), reps)
    tn = run_times(lambda: a @ b, reps)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tt = run_times(lambda: torch.mm(ta, tb), reps)
    return {"n": n, "jax_gflops": flops / median(tj) / 1e9, "numpy_gflops": flops / median(tn) / 1e9,
            "torch_gflops": flops / median(tt) / 1e9, "jax_times": tj, "numpy_times": tn, "torch_times": tt,
            "jax_device": str(jax.devices()[0])}


def worker_jax(cfg) -> dict:
    """jaxroute DGR on a global batch split over ``devices`` devices."""
    import jax

    from jaxroute.routing.dgr import DGRConfig
    from jaxroute.routing import route_outputs
    from jaxroute.utils.devices import batch_sharding, shard_batch

    devices = jax.devices()
    nd = cfg["devices"]
    if len(devices) < nd:
        return {"skipped": f"only {len(devices)} JAX device(s) available, {nd} asked"}
    devices = devices[:nd]
    b = cfg["batch"]
    if b % nd:
        return {"skipped": f"batch {b} does not split over {nd} devices"}
    loaded = _jax_loaded(cfg)
    route = route_outputs(loaded, "dgr", DGRConfig(steps=cfg["steps"]))
    sharding = batch_sharding(devices)
    batches = [shard_batch(x, sharding) for x in _batches(_pool(cfg), b, cfg["repeats"] + 1)]
    jax.block_until_ready(batches)
    rss_base = rss_now_mib()

    fwd_cost = None
    if cfg.get("fwd_cost"):  # XLA's FLOP count of one forward pass of one image (a sanity check)
        ca = jax.jit(loaded.logits).lower(batches[0][:1]).compile().cost_analysis() or {}
        fwd_cost = (ca[0] if isinstance(ca, list) else ca).get("flops")
    t = time.perf_counter()
    compiled = route.lower(batches[0]).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(batches[0]))
    first_s = time.perf_counter() - t
    times = []
    for x in batches[1:]:
        t = time.perf_counter()
        jax.block_until_ready(compiled(x))
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "first_call_s": first_s, "times": times, "median_s": median(times),
            "images_per_s": b / median(times), "rss_base_mib": rss_base, "rss_peak_mib": rss_peak_mib(),
            "device_peak_bytes": _device_memory(jax), "fwd_cost_flops_per_image": fwd_cost, "jax_devices": [str(d) for d in devices]}


def worker_job(cfg) -> dict:
    """The resumable route job (as ``jaxroute route`` runs it) on ``images`` pool images: peak RSS.

    Inputs stream from a uint8 ``.npy`` (the format of the ImageFolder cache that
    ``jaxroute route`` reads batch by batch) and shards go to disk as they
    finish, so peak memory should depend on the batch, not on how many images
    are routed.
    """
    import jax

    from jaxroute.data import Dataset
    from jaxroute.data.stored import StoredImages
    from jaxroute.extraction import plan_batches
    from jaxroute.routing import DGRConfig, route_dataset

    n = cfg["images"]
    x = StoredImages(cfg["input"])
    ds = Dataset(x, (np.arange(n) % 10).astype(np.int32), tuple(str(i) for i in range(10)), "pool")
    loaded = _jax_loaded(cfg)
    plan = plan_batches(n, cfg["batch"], cfg["shard"])
    rss_base = rss_now_mib()
    t = time.perf_counter()
    summary = route_dataset(loaded, ds, cfg["out"], plan=plan, config=DGRConfig(steps=cfg["steps"]),
                            source={"weights": "benchmark", "data": "pool"}, progress=False)
    return {"images": n, "seconds": time.perf_counter() - t, "images_per_s": summary.get("images_per_s"),
            "input_mib": os.path.getsize(cfg["input"]) / 2**20,
            "rss_base_mib": rss_base, "rss_peak_mib": rss_peak_mib(), "devices": jax.local_device_count()}


def worker_torch_official(cfg) -> dict:
    import torch

    from benchmarks import torch_dgr as td

    threads = td.set_threads(cfg["threads"])
    dev, sync = _torch_device(cfg, torch)
    model = _torch_model(cfg, td, channels_last=False).to(dev)
    imgs = _batches(_pool(cfg), 1, cfg["images"] + 1)
    xs = [td.to_torch_input(x).to(dev) for x in imgs]
    rss_base = rss_now_mib()
    t = time.perf_counter()
    td.dgr_official(model, xs[0], steps=2)  # warm-up (oneDNN primitives, allocator), T=2 to save time
    sync()
    warmup_s = time.perf_counter() - t
    times = []
    for x in xs[1:]:
        t = time.perf_counter()
        td.dgr_official(model, x, steps=cfg["steps"])
        sync()
        times.append(time.perf_counter() - t)
    return {"warmup_T2_s": warmup_s, "times": times, "median_s": median(times), "images_per_s": 1 / median(times),
            "rss_base_mib": rss_base, "rss_peak_mib": rss_peak_mib(), "torch_threads": threads,
            "torch_version": torch.__version__}


def _torch_device(cfg, torch):
    """(device, synchronize): CUDA when asked (timings then wait for the GPU), else the CPU."""
    if cfg.get("torch_device", "cpu") == "cuda":
        return torch.device("cuda"), torch.cuda.synchronize
    return torch.device("cpu"), lambda: None


def _torch_model(cfg, td, channels_last):
    depth = int(cfg["model"][6:])
    if cfg.get("checkpoint"):
        return td.build_model(depth, checkpoint=cfg["checkpoint"], channels_last=channels_last)
    return td.build_model(depth, flax_variables=dict(np.load(cfg["weights"])), channels_last=channels_last)


def worker_torch_batched(cfg) -> dict:
    import torch

    from benchmarks import torch_dgr as td

    threads = td.set_threads(cfg["threads"])
    dev, sync = _torch_device(cfg, torch)
    model = _torch_model(cfg, td, channels_last=True).to(dev)
    compile_s = None
    if cfg.get("torch_compile"):
        t = time.perf_counter()
        model = torch.compile(model, dynamic=False)
        compile_s = time.perf_counter() - t
    b = cfg["batch"]
    xs = [td.to_torch_input(x, channels_last=True).to(dev) for x in _batches(_pool(cfg), b, cfg["repeats"] + 1)]
    rss_base = rss_now_mib()
    t = time.perf_counter()
    td.dgr_batched(model, xs[0], steps=2)  # warm-up (T=2 to save time), also torch.compile's compilation
    sync()
    warmup_s = time.perf_counter() - t
    times = []
    for x in xs[1:]:
        t = time.perf_counter()
        td.dgr_batched(model, x, steps=cfg["steps"])
        sync()
        times.append(time.perf_counter() - t)
    if compile_s is not None:  # torch.compile compiles lazily, during the warm-up call
        compile_s = warmup_s
    return {"warmup_T2_s": warmup_s, "compile_s": compile_s, "times": times, "median_s": median(times),
            "images_per_s": b / median(times), "rss_base_mib": rss_base, "rss_peak_mib": rss_peak_mib(),
            "torch_threads": threads}


def worker_steps(cfg) -> dict:
    """Diagnostics: one forward, and one forward+backward w.r.t. the gates, at one batch size."""
    b, reps = cfg["batch"], cfg["repeats"]
    x = _batches(_pool(cfg), b, 1)[0]

    def timeit(fn):
        return median(run_times(fn, reps))

    if cfg["impl"] == "jax":
        from functools import partial

        import jax
        import jax.numpy as jnp

        from jaxroute.models.gates import unflatten_gates
        from jaxroute.utils.conv_grads import canonical_conv_grads

        loaded = _jax_loaded(cfg)
        spec, f = loaded.spec, (lambda g, x: loaded.logits(x, g))
        f_loop = canonical_conv_grads(f)
        xj = jnp.asarray(x)
        p = jax.nn.softmax(f(None, xj))
        g = jnp.full((b, spec.size), 0.9, jnp.float32)

        def fwd(g, fn=f):
            return fn(unflatten_gates(spec, g), xj)

        def ce(g, fn=f):
            return -(p * jax.nn.log_softmax(fwd(g, fn))).sum()

        def scan_steps(g, n, fn):  # the same step inside a rolled lax.scan, as dgr_route runs it
            grad = jax.grad(partial(ce, fn=fn))
            return jax.lax.scan(lambda g, _: (g - 0.01 * grad(g), None), g, None, length=n)[0]

        jf, jg = jax.jit(fwd), jax.jit(jax.grad(ce))
        cf = jf.lower(g).compile().cost_analysis() or {}
        cg = jg.lower(g).compile().cost_analysis() or {}
        cf = cf[0] if isinstance(cf, list) else cf
        cg = cg[0] if isinstance(cg, list) else cg
        n_scan = 4
        js = jax.jit(partial(scan_steps, n=n_scan, fn=f))
        jl = jax.jit(partial(scan_steps, n=n_scan, fn=f_loop))
        return {"fwd_s": timeit(lambda: jf(g).block_until_ready()),
                "fwd_bwd_s": timeit(lambda: jg(g).block_until_ready()),
                "fwd_bwd_in_scan_s": timeit(lambda: js(g).block_until_ready()) / n_scan,
                "fwd_bwd_in_scan_loop_friendly_s": timeit(lambda: jl(g).block_until_ready()) / n_scan,
                "cost_fwd_flops": cf.get("flops"), "cost_fwd_bwd_flops": cg.get("flops")}
    import torch

    from benchmarks import torch_dgr as td

    td.set_threads(cfg["threads"])
    model = _torch_model(cfg, td, channels_last=True)
    xt = td.to_torch_input(x, channels_last=True)
    with torch.no_grad():
        p = torch.softmax(model(xt), -1)
    g = torch.full((b, sum(model.gate_channels)), 0.9)

    def fwd():
        with torch.no_grad():
            model(xt, td._split(model, g))

    return {"fwd_s": timeit(fwd), "fwd_bwd_s": timeit(lambda: td.fwd_bwd_step(model, xt, g, p))}


def worker_crosscheck(cfg) -> dict:
    """jaxroute vs batched PyTorch DGR on a few images: the same problem, the same gates.

    Both sides run in float64: DGR's momentum steps amplify float32 rounding, so in
    float32 two correct implementations on different CPUs (other kernels, other
    rounding) drift apart by more than any fixed tolerance; in float64 they agree
    to about 1e-9 after T steps.
    """
    from functools import partial

    import jax
    import jax.numpy as jnp

    from benchmarks import torch_dgr as td
    from jaxroute.routing.dgr import DGRConfig, dgr_route

    jax.config.update("jax_enable_x64", True)
    td.set_threads(cfg["threads"])
    x = _batches(_pool(cfg), cfg["images"], 1)[0].astype(np.float64)
    loaded = _jax_loaded(cfg)
    loaded = loaded.with_variables(jax.tree.map(lambda v: np.asarray(v, np.float64), loaded.variables))
    r = jax.jit(partial(dgr_route, loaded, config=DGRConfig(steps=cfg["steps"])))(jnp.asarray(x))
    model = _torch_model(cfg, td, channels_last=False).double()
    t = td.dgr_batched(model, td.to_torch_input(x, dtype=np.float64), steps=cfg["steps"])
    jg, tg = np.asarray(r.cdrp), t["cdrp"].detach().numpy()
    return {"images": len(x), "steps": cfg["steps"], "max_abs_diff_gates": float(np.abs(jg - tg).max()),
            "max_abs_diff_full_logits": float(np.abs(np.asarray(r.full_logits)
                                                     - t["full_logits"].detach().numpy()).max()),
            "gate_range": [float(jg.min()), float(jg.max())],
            "same_fallbacks": bool((np.asarray(r.fell_back) == t["fell_back"].numpy()).all()),
            "same_preds": bool((np.asarray(r.pred) == t["pred"].numpy()).all())}


WORKERS = {"matmul": worker_matmul, "jax": worker_jax, "job": worker_job, "torch_official": worker_torch_official,
           "torch_batched": worker_torch_batched, "steps": worker_steps, "crosscheck": worker_crosscheck}


def run_worker(cfg: dict) -> None:
    if cfg.get("pin_cores"):  # before jax starts: XLA sizes its thread pool from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: cfg["pin_cores"]])
    try:
        res = WORKERS[cfg["kind"]](cfg)
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    print(RESULT_TAG + json.dumps(res), flush=True)


# --------------------------------------------------------------------------
# the parent: plan, spawn, collect, report
# --------------------------------------------------------------------------

def spawn(cfg: dict, xla_devices: int | None = None, timeout: float | None = None,
          env_extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if xla_devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={xla_devices}"])
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.routing", "--worker", json.dumps(cfg)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            if "error" in res:
                sys.stderr.write(proc.stderr[-3000:])
            res["process_wall_s"] = wall
            return res
    sys.stderr.write(proc.stderr[-3000:])
    return {"error": f"worker exited with {proc.returncode} and no result"}


def machine_info(torch_threads: int) -> dict:
    import jax
    import jaxlib
    import torch

    from benchmarks.machine import cpu_model

    cpu = cpu_model()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_usable": affinity, "loadavg_start": load,
            "platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "jax_devices": [str(d) for d in jax.devices()],
            "jax_backend": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "torch_threads": torch_threads}


def fmt(v, spec=".2f", dash="—"):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return dash
    return format(v, spec)


def parse_ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="the primary model (default resnet20)")
    ap.add_argument("--models", default=None,
                    help="comma-separated models, the first is primary (default resnet20,resnet56)")
    ap.add_argument("--batch-sizes", default=None, help="jaxroute / batched-torch batch sizes of the "
                    "primary model (default 32,64,128,256)")
    ap.add_argument("--other-batch-sizes", default=None,
                    help="batch sizes of the other models (default 32,128)")
    ap.add_argument("--n-images", type=int, default=None, help="size of the image pool (default: largest batch)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per configuration (default 3)")
    ap.add_argument("--official-images", type=int, default=None,
                    help="images routed one at a time by the official loop (default 10)")
    ap.add_argument("--devices", default=None, help="JAX device counts for the scaling rows (default 1,2,4)")
    ap.add_argument("--scaling-batch", type=int, default=None, help="global batch of the scaling rows (default 128)")
    ap.add_argument("--step-batch", type=int, default=None, help="batch of the per-step diagnostics (default 128)")
    ap.add_argument("--steps", type=int, default=30, help="DGR iterations T (default 30, the paper's)")
    ap.add_argument("--job-images", default=None,
                    help="image counts for the streaming-memory rows of the route job (default 512,2048)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default os.cpu_count())")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time the batched PyTorch peer with torch.compile (inductor)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    ap.add_argument("--accelerator", action="store_true",
                    help="JAX's default backend is a GPU/TPU: jaxroute rows use its devices, the PyTorch peers run "
                         "on CUDA, and the CPU-only rows (column pairing, pinned cores) are left out")
    ap.add_argument("--job-batch", type=int, default=None,
                    help="per-device batch of the route-job rows (default 32; 256 suits a GPU)")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (about 2 minutes)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per configuration subprocess")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker))
        return 0

    q = QUICK if args.quick else {}
    models = args.models.split(",") if args.models else [args.model or "resnet20", "resnet56"]
    if args.model:
        models = [args.model] + [m for m in models if m != args.model]
    models = list(dict.fromkeys(m.strip() for m in models if m.strip()))
    batch_sizes = parse_ints(args.batch_sizes or q.get("batch_sizes", "32,64,128,256"))
    other_bs = parse_ints(args.other_batch_sizes or q.get("other_batch_sizes", "32,128"))
    repeats = args.repeats or q.get("repeats", 3)
    n_images = args.n_images or q.get("n_images", max(batch_sizes + other_bs))
    official_images = args.official_images or q.get("official_images", 10)
    devices = parse_ints(args.devices or q.get("devices", "1,2,4"))
    scaling_batch = args.scaling_batch or q.get("scaling_batch", 128)
    step_batch = args.step_batch or q.get("step_batch", 128)
    threads = args.threads or os.cpu_count() or 1
    T = args.steps

    import torch

    torch.set_num_threads(threads)
    info = machine_info(torch.get_num_threads())
    print("# jaxroute routing benchmark (DGR)\n")
    print("## Machine")
    for k in ("cpu", "cpu_count", "cpus_usable", "loadavg_start", "platform", "python", "jax", "jaxlib",
              "torch", "numpy", "jax_backend", "jax_devices", "XLA_FLAGS", "torch_threads"):
        print(f"- {k}: {info[k]}")
    print(f"- settings: models={models} batch_sizes={batch_sizes} other_batch_sizes={other_bs} T={T} "
          f"repeats={repeats} pool={n_images} official_images={official_images} devices={devices} "
          f"scaling_batch={scaling_batch} quick={args.quick}", flush=True)
    if info["loadavg_start"] and float(info["loadavg_start"][0]) >= 0.5 * (info["cpu_count"] or 1):
        print(f"WARNING: load average {info['loadavg_start'][0]} on {info['cpu_count']} cores: the machine is "
              "busy, timings are unreliable (PyTorch's OpenMP threads suffer most)", flush=True)

    if args.accelerator:
        devices = [1] if args.devices is None else devices
    tmp = Path(tempfile.mkdtemp(prefix="jaxroute-bench-"))
    try:
        return _main(args, info, tmp, models, batch_sizes, other_bs, repeats, n_images, official_images, devices,
                     scaling_batch, step_batch, threads, T, q)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(args, info, tmp, models, batch_sizes, other_bs, repeats, n_images, official_images, devices,
          scaling_batch, step_batch, threads, T, q) -> int:
    pool, labels, pool_src = cifar_images(n_images)
    np.save(tmp / "pool.npy", pool)
    print(f"- inputs: {len(pool)} {pool_src} (the same pool for every configuration)")
    model_info = {}
    for m in models:
        model_info[m] = prepare_weights(m, tmp / f"{m}.npz")
        print(f"- model {m}: {model_info[m]['weights']}, {model_info[m]['gate_points']} gate points, "
              f"{model_info[m]['gates']} gates")
    print(flush=True)

    results: list[dict] = []
    t_run = time.perf_counter()

    ncores = os.cpu_count() or 1
    accel = args.accelerator
    if accel:  # jaxroute on the accelerator's devices; on a CPU one device per core (the library's default)
        import jax

        ndev = jax.local_device_count()
    else:
        ndev = ncores
    ablation_batch = q.get("ablation_batch", 64)
    job_batch = args.job_batch or q.get("job_batch", 32)
    job_images = parse_ints(args.job_images or q.get("job_images", "512,2048"))

    def run(label, cfg, xla_devices=None, env_extra=None):
        cfg = {"pool": str(tmp / "pool.npy"), "steps": T, "threads": threads,
               "torch_device": "cuda" if accel else "cpu", **cfg}
        if "model" in cfg:
            cfg.setdefault("weights", str(tmp / f"{cfg['model']}.npz"))
            cfg.setdefault("checkpoint", model_info[cfg["model"]]["checkpoint"])
        print(f"[{time.perf_counter() - t_run:6.0f}s] {label} ...", end=" ", flush=True)
        res = spawn(cfg, xla_devices, args.timeout, env_extra)
        res = {**{k: v for k, v in cfg.items() if k not in ("pool", "weights", "checkpoint")}, **res}
        res["label"] = label
        print(res.get("error") or res.get("skipped") or
              (f"{res['images_per_s']:.2f} img/s" if "images_per_s" in res else "done"), flush=True)
        results.append(res)
        return res

    mm = run("matmul peak (2048x2048 float32)", {"kind": "matmul", "n": 2048,
                                                "repeats": q.get("matmul_repeats", 10)})
    torch_ok = not args.no_torch
    primary = models[0]
    if torch_ok and is_cifar_resnet(primary):
        cc = run(f"cross-check {primary} T=5", {"kind": "crosscheck", "model": primary, "images": 4, "steps": 5})
    else:
        cc = None
    for m in models:
        bss = batch_sizes if m == primary else other_bs
        peer = torch_ok and is_cifar_resnet(m)
        if peer:
            run(f"{m} official loop (torch, 1 image at a time)",
                {"kind": "torch_official", "model": m, "images": official_images})
            for b in bss:
                run(f"{m} torch batched B={b}", {"kind": "torch_batched", "model": m, "batch": b,
                                                "repeats": repeats})
                if args.torch_compile:
                    run(f"{m} torch batched+compile B={b}", {"kind": "torch_batched", "model": m, "batch": b,
                                                            "repeats": repeats, "torch_compile": True})
        run(f"{m} jaxroute B=1", {"kind": "jax", "model": m, "batch": 1, "devices": 1,
                                   "repeats": 3 * repeats, "fwd_cost": True}, xla_devices=1)
        for b in bss:
            # As the library is meant to run on a CPU: one device per core, the batch split over them.
            run(f"{m} jaxroute B={b} ({ndev} devices)",
                {"kind": "jax", "model": m, "batch": b, "devices": ndev, "repeats": repeats},
                xla_devices=None if accel else ncores)
        if m == primary and not accel:
            # The column-pairing formulation of narrow convs (jaxroute.utils.conv_grads) switched off.
            b1 = bss[0]
            run(f"{m} jaxroute B={b1} ({ncores} devices), no column pairing",
                {"kind": "jax", "model": m, "batch": b1, "devices": ncores, "repeats": repeats,
                 "variant": "no column pairing"}, xla_devices=ncores,
                env_extra={"JAXROUTE_CONV_GRADS": "canonical"})
        if m == primary and ncores > 1 and not accel:
            b0 = ablation_batch
            run(f"{m} jaxroute B={b0}, 1 device", {"kind": "jax", "model": m, "batch": b0, "devices": 1,
                                                    "repeats": repeats, "variant": "1 device"}, xla_devices=1)
            run(f"{m} jaxroute B={b0}, 1 device, JAX's own conv gradients",
                {"kind": "jax", "model": m, "batch": b0, "devices": 1, "repeats": repeats,
                 "variant": "1 device, JAX's own conv grads"}, xla_devices=1,
                env_extra={"JAXROUTE_CONV_GRADS": "plain"})
    for nd in devices:
        run(f"{primary} jaxroute B={scaling_batch} on {nd} device(s)",
            {"kind": "jax", "model": primary, "batch": scaling_batch, "devices": nd, "repeats": repeats,
             "variant": "scaling"}, xla_devices=nd)
    if hasattr(os, "sched_setaffinity") and not accel:
        # Weak scaling with the hardware: N devices pinned to N cores, 16 images per device.
        for nd in [d for d in devices if d <= ncores]:
            run(f"{primary} jaxroute B={16 * nd} on {nd} device(s) pinned to {nd} core(s)",
                {"kind": "jax", "model": primary, "batch": 16 * nd, "devices": nd, "repeats": repeats,
                 "variant": "scaling, 1 core per device", "pin_cores": nd}, xla_devices=nd)
    job_rows = []
    from jaxroute.data.stored import save_stored_images

    for n_job in job_images:  # streaming: peak memory of the real job vs the number of images routed
        # The job's input as the ImageFolder cache holds it (uint8 .npy), written here, outside the worker.
        save_stored_images(tmp / f"job-input-{n_job}.npy",
                           np.round(pool[np.arange(n_job) % len(pool)] * 255).astype(np.uint8))
        job_rows.append(run(f"{primary} route job, {n_job} images ({ndev} devices, {job_batch}/device)",
                            {"kind": "job", "model": primary, "images": n_job, "batch": job_batch,
                             "shard": job_batch * ndev * 4, "out": str(tmp / f"job-{n_job}"),
                             "input": str(tmp / f"job-input-{n_job}.npy")},
                            xla_devices=None if accel else ncores))
    steps_diag = {"jax": run(f"{primary} per-step jax B={step_batch}",
                             {"kind": "steps", "impl": "jax", "model": primary, "batch": step_batch,
                              "repeats": max(repeats, 5)}, xla_devices=1)}
    if torch_ok and is_cifar_resnet(primary):
        steps_diag["torch"] = run(f"{primary} per-step torch B={step_batch}",
                                  {"kind": "steps", "impl": "torch", "model": primary, "batch": step_batch,
                                   "repeats": max(repeats, 5)})
    total_s = time.perf_counter() - t_run

    # ---------------- report ----------------
    peak = mm.get("jax_gflops")
    fwd_cost = {r["model"]: r.get("fwd_cost_flops_per_image") for r in results
                if r.get("kind") == "jax" and r.get("fwd_cost")}
    flops = {m: flop_model(m, fwd_cost.get(m)) for m in models}
    rows = []
    for r in results:
        if r.get("kind") not in ("jax", "torch_official", "torch_batched"):
            continue
        m = r["model"]
        official = r["kind"] == "torch_official"
        impl = {"jax": "jaxroute" + (f" ({r['variant']})" if r.get("variant") else ""),
                "torch_official": "official loop (torch)",
                "torch_batched": "torch batched" + (" +compile" if r.get("torch_compile") else "")}[r["kind"]]
        b = 1 if official else r["batch"]
        ips = r.get("images_per_s")
        work = dgr_flops_per_image(flops[m], T, official)
        gf = ips * work / 1e9 if ips else None
        rows.append({"model": m, "impl": impl, "batch": b, "devices": r.get("devices", 1), "res": r,
                     "images_per_s": ips, "gflops": gf, "frac_peak": gf / peak if gf and peak else None,
                     "work_gflop_per_image": work / 1e9})
    base_off = {r["model"]: r["images_per_s"] for r in rows if r["impl"].startswith("official")}
    base_tb = {(r["model"], r["batch"]): r["images_per_s"] for r in rows if r["impl"] == "torch batched"}
    for r in rows:
        o, tb = base_off.get(r["model"]), base_tb.get((r["model"], r["batch"]))
        r["x_official"] = r["images_per_s"] / o if r["images_per_s"] and o else None
        r["x_torch_batched"] = r["images_per_s"] / tb if r["images_per_s"] and tb else None

    print(f"\n## Results (DGR, T={T}; medians over repeats; {info['torch_threads']} torch threads)\n")
    print(f"matmul peak, 2048x2048 float32, median: jnp.dot {fmt(mm.get('jax_gflops'), '.1f')} GFLOP/s, "
          f"numpy {fmt(mm.get('numpy_gflops'), '.1f')}, torch.mm {fmt(mm.get('torch_gflops'), '.1f')}\n")
    print("| model | implementation | batch | devices | compile s | first call s | median s/call | images/s "
          "| × official | × torch batched (same B) | GFLOP/s | % jnp matmul peak | peak RSS MiB | device peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        res = r["res"]
        if "error" in res or "skipped" in res:
            print(f"| {r['model']} | {r['impl']} | {r['batch']} | {r['devices']} | "
                  f"{res.get('error') or res.get('skipped')} |||||||||")
            continue
        dev = res.get("device_peak_bytes") or {}
        devm = max(dev.values()) / 2**20 if dev and all(v is not None for v in dev.values()) else None
        print(f"| {r['model']} | {r['impl']} | {r['batch']} | {r['devices']} | {fmt(res.get('compile_s'))} | "
              f"{fmt(res.get('first_call_s'))} | {fmt(res.get('median_s'), '.3f')} | {fmt(r['images_per_s'])} | "
              f"{fmt(r['x_official'])} | {fmt(r['x_torch_batched'])} | {fmt(r['gflops'], '.1f')} | "
              f"{fmt(100 * r['frac_peak'] if r['frac_peak'] else None, '.1f')} | {fmt(res.get('rss_peak_mib'), '.0f')} | "
              f"{fmt(devm, '.0f')} |")

    print("\nWork per image (GFLOP): jaxroute and torch batched (T-1)*(fwd+bwd_input)+2*fwd; "
          "official loop T*(fwd+bwd_input)+fwd.")
    for m in models:
        fm = flops[m]
        print(f"- {m}: fwd {fm['fwd'] / 1e6:.1f} MFLOP, bwd_input {fm['bwd_input'] / 1e6:.1f} MFLOP ({fm['source']}); "
              f"DGR {dgr_flops_per_image(fm, T, False) / 1e9:.3f} GFLOP, official {dgr_flops_per_image(fm, T, True) / 1e9:.3f}")
        if fm["layers"]:
            groups: dict[str, int] = {}
            for name, macs in fm["layers"]:
                g = name.split(".")[0]
                groups[g] = groups.get(g, 0) + macs
            print("  MACs: " + ", ".join(f"{g} {v / 1e6:.2f}M" for g, v in groups.items()))
    sj = steps_diag["jax"]
    if sj.get("cost_fwd_flops"):
        an = flops[primary]["fwd"] * step_batch
        print(f"- check: XLA cost_analysis of the {primary} forward at B={step_batch}: "
              f"{sj['cost_fwd_flops'] / 1e9:.2f} GFLOP vs analytic {an / 1e9:.2f} "
              f"(ratio {sj['cost_fwd_flops'] / an:.3f}; XLA skips the zero-padding taps); forward+backward "
              f"{sj['cost_fwd_bwd_flops'] / 1e9:.2f} vs analytic "
              f"{(flops[primary]['fwd'] + flops[primary]['bwd_input']) * step_batch / 1e9:.2f}")

    print(f"\nPer-step diagnostics ({primary}, B={step_batch}, median): one forward / one forward+backward "
          "w.r.t. the gates")
    for k, v in steps_diag.items():
        if "fwd_s" in v:
            extra = ""
            if v.get("fwd_bwd_in_scan_s"):
                extra = (f"; fwd+bwd inside a rolled lax.scan (as dgr_route runs it): JAX's own conv gradients "
                         f"{v['fwd_bwd_in_scan_s'] * 1e3:.1f} ms/step ({v['fwd_bwd_in_scan_s'] / v['fwd_bwd_s']:.2f}x "
                         f"the standalone step), loop-friendly conv gradients "
                         f"{v['fwd_bwd_in_scan_loop_friendly_s'] * 1e3:.1f} ms/step "
                         f"({v['fwd_bwd_in_scan_loop_friendly_s'] / v['fwd_bwd_s']:.2f}x)")
            print(f"- {k}: fwd {v['fwd_s'] * 1e3:.1f} ms, fwd+bwd {v['fwd_bwd_s'] * 1e3:.1f} ms "
                  f"(fwd+bwd / fwd = {v['fwd_bwd_s'] / v['fwd_s']:.2f}){extra}")
        else:
            print(f"- {k}: {v.get('error')}")

    if job_rows:
        print("\nStreaming (the resumable route job reads its input per batch from a uint8 .npy and writes "
              "shards as it goes): peak RSS vs images routed")
        print("| images | devices | per-device batch | seconds | images/s | peak RSS MiB | input file MiB (on disk) "
              "|\n|---:|---:|---:|---:|---:|---:|---:|")
        for r in job_rows:
            if "error" in r:
                print(f"| {r.get('images')} | {r['error']} |||||")
                continue
            print(f"| {r['images']} | {r['devices']} | {r['batch']} | {fmt(r['seconds'], '.1f')} | "
                  f"{fmt(r['images_per_s'])} | {fmt(r['rss_peak_mib'], '.0f')} | {fmt(r['input_mib'], '.1f')} |")

    if cc is not None:
        if "error" in cc:
            print(f"\nCross-check failed to run: {cc['error']}")
        else:
            ok = cc["max_abs_diff_gates"] < CROSSCHECK_TOL and cc["same_preds"]
            print(f"\nCross-check ({primary}, {cc['images']} images, T={cc['steps']}): jaxroute vs torch batched "
                  f"gates max abs diff {cc['max_abs_diff_gates']:.2e} (gates in [{cc['gate_range'][0]:.3f}, "
                  f"{cc['gate_range'][1]:.3f}]), full logits {cc['max_abs_diff_full_logits']:.2e}, "
                  f"same predictions {cc['same_preds']}, same fallbacks {cc['same_fallbacks']}: "
                  f"{'PASS' if ok else 'FAIL'} (float64 both sides, tolerance {CROSSCHECK_TOL:g})")

    jr = [r for r in rows if r["impl"] == "jaxroute" and r["images_per_s"]]
    summary = {}
    for m in models:
        best_j = max((r for r in jr if r["model"] == m and r["batch"] > 1), key=lambda r: r["images_per_s"],
                     default=None)
        tbs = [r for r in rows if r["model"] == m and r["impl"].startswith("torch batched") and r["images_per_s"]]
        best_t = max(tbs, key=lambda r: r["images_per_s"], default=None)
        b1 = next((r["images_per_s"] for r in jr if r["model"] == m and r["batch"] == 1), None)
        s = {"best_jaxroute_images_per_s": best_j and best_j["images_per_s"],
             "jaxroute_batch1_images_per_s": b1,
             "best_jaxroute_batch": best_j and best_j["batch"],
             "best_jaxroute_devices": best_j and best_j["devices"],
             "best_jaxroute_frac_matmul_peak": best_j and best_j["frac_peak"],
             "official_images_per_s": base_off.get(m),
             "best_torch_batched_images_per_s": best_t and best_t["images_per_s"],
             "best_torch_batched_batch": best_t and best_t["batch"]}
        if best_j and base_off.get(m):
            s["jaxroute_vs_official"] = best_j["images_per_s"] / base_off[m]
        if best_j and best_t:
            s["jaxroute_vs_best_torch_batched"] = best_j["images_per_s"] / best_t["images_per_s"]
        if best_j and b1:
            s["batching_gain"] = best_j["images_per_s"] / b1
        summary[m] = s
        print(f"\nSummary {m}: best jaxroute {fmt(s['best_jaxroute_images_per_s'])} img/s (B={s['best_jaxroute_batch']}, "
              f"{s['best_jaxroute_devices']} devices, "
              f"{fmt(100 * s['best_jaxroute_frac_matmul_peak'] if s['best_jaxroute_frac_matmul_peak'] else None, '.1f')}% "
              f"of the matmul peak); "
              f"official loop {fmt(s['official_images_per_s'])} img/s; best torch batched "
              f"{fmt(s['best_torch_batched_images_per_s'])} img/s (B={s['best_torch_batched_batch']}); "
              f"jaxroute B=1 {fmt(s['jaxroute_batch1_images_per_s'])} img/s (batching gain "
              f"{fmt(s.get('batching_gain'))}×); jaxroute/official {fmt(s.get('jaxroute_vs_official'))}×, "
              f"jaxroute/torch batched {fmt(s.get('jaxroute_vs_best_torch_batched'))}×")
    try:
        info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    print(f"\nload average at start {info.get('loadavg_start')}, at end {info.get('loadavg_end')} "
          f"(on a {info['cpu_count']}-core machine; compare timings only from quiet runs); "
          f"benchmark wall time {total_s:.0f} s")
    out = {"benchmark": "jaxroute.routing.dgr", "steps": T, "machine": info, "models": model_info,
           "flops": {m: {k: v for k, v in f.items() if k != "layers"} for m, f in flops.items()},
           "matmul": mm, "crosscheck": cc, "per_step": steps_diag, "summary": summary, "job": job_rows,
           "rows": [{k: v for k, v in r.items() if k != "res"} | {"raw": r["res"]} for r in rows],
           "wall_s": total_s}
    line = json.dumps(out)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
