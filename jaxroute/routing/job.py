"""The large-scale extraction job: route a data set into resumable numpy shards.

Output directory::

    manifest.json      model, data, method, hyper-parameters, gate layout
                       (names, channels, offsets), shard size, counts
    shard-00000.npz    one per ``shard_size`` samples, plain numpy:
                       index, label, cdrp (n, D), pred, gated_pred,
                       full_logits, gated_logits, loss (DGR) or
                       iterations (AWR/AAR), fell_back, features
                       (the full model's penultimate activations)
    summary.json       Table-1 metrics over all shards, throughput

Every file is written atomically (temp file + rename), so a job killed at
any moment leaves only complete shards; started again with the same
arguments it skips them and recomputes the rest.  Routing is deterministic
for a fixed batch composition and shard boundaries are fixed, so the final
output equals an uninterrupted run's.  A manifest written by different
arguments is refused rather than mixed.

Parallelism: ``batch_size`` is the batch *per device*; a global batch of
``batch_size * local devices`` is split over all local JAX devices
(``jax.sharding``, data-parallel; no communication, samples are
independent).  Every device so runs the same compiled shape whatever the
device count, which keeps results bit-identical between 1 and N devices.
Several processes (``jax.distributed``) each take the shards
``i % process_count == process_index``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.data import Dataset, batches
from jaxroute.models.gates import GateSpec
from jaxroute.routing.baselines import prune_route, weight_l1_scores
from jaxroute.routing.dgr import DGRConfig, dgr_route
from jaxroute.routing.metrics import routing_metrics
from jaxroute.utils.conv_grads import loop_friendly
from jaxroute.utils.devices import batch_sharding, map_batches, shard_batch
from jaxroute.utils.io import atomic_save_npz, atomic_write_text

METHODS = ("dgr", "awr", "aar")
MANIFEST = "manifest.json"
SUMMARY = "summary.json"


@dataclasses.dataclass(frozen=True)
class RouteJob:
    """Everything that determines a job's output (compared on resume)."""

    model: str
    weights: str
    data: str
    split: str
    limit: int | None
    method: str = "dgr"
    dgr: DGRConfig = DGRConfig()
    prune_frac: float = 0.02
    gate_placement: str = "post_act"
    batch_size: int = 128  # per device
    shard_size: int = 1024

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 1 or self.shard_size < 1 or self.shard_size % self.batch_size:
            raise ValueError(f"shard_size ({self.shard_size}) must be a positive multiple of "
                             f"batch_size ({self.batch_size})")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def make_router(loaded, method: str, dgr: DGRConfig = DGRConfig(), prune_frac: float = 0.02) -> Callable:
    """A jitted ``route(x) -> dict of per-sample arrays`` for one method."""
    spec = loaded.spec
    module, variables = loaded.module, loaded.variables
    @loop_friendly  # the same conv formulations as the routing itself (column pairing on CPU)
    def features(x):
        # Penultimate activations of the full model: the baseline feature for detectors.
        return module.apply(variables, x, capture=True)[1]["features"]

    if method == "dgr":
        fn = partial(dgr_route, loaded.logits_fn(), spec, config=dgr)

        def route(x):
            r = fn(x)
            return {"cdrp": r.cdrp, "pred": r.pred, "gated_pred": r.gated_pred, "loss": r.loss,
                    "fell_back": r.fell_back, "full_logits": r.full_logits, "gated_logits": r.gated_logits,
                    "features": features(x)}
    else:
        def capture_fn(g, x):
            logits, cap = module.apply(variables, x, gates=g, capture=True)
            return logits, cap["gates"]

        ws = weight_l1_scores(variables["params"], spec) if method == "awr" else None

        def route(x):
            r = prune_route(capture_fn, spec, x, method, weight_scores=ws, frac=prune_frac)
            return {"cdrp": r.cdrp, "pred": r.pred, "gated_pred": r.gated_pred, "iterations": r.iterations,
                    "fell_back": r.iterations == 0, "full_logits": r.full_logits,
                    "gated_logits": r.gated_logits, "features": features(x)}
    return jax.jit(route)


def route_array(router: Callable, x, batch_size: int) -> dict[str, np.ndarray]:
    """Route an array of any length in fixed-shape batches (:func:`jaxroute.utils.devices.map_batches`).

    With one compiled batch shape, a sample's gates do not depend on which
    other samples share its batch, nor on its position: routing it alone
    (padded) or inside a full batch gives bit-identical results.  Across
    *different* compiled batch shapes XLA may pick other kernels, and the
    float-rounding differences can grow over DGR's 30 steps for some samples.
    """
    return map_batches(lambda i, xb: router(xb), (x,), batch_size)


def batch_size_for_memory(router: Callable, input_shape, budget_bytes: int, probes=(8, 32)) -> int:
    """Largest per-device batch whose compiled routing program fits ``budget_bytes``.

    Compiles the router at two batch sizes, reads XLA's memory analysis
    (temporaries + arguments + outputs; weights are constants of the program
    and counted too), extrapolates linearly, then compiles the chosen size to
    check it -- XLA's buffer assignment is only roughly affine in the batch --
    and shrinks it until it fits.
    """

    def need(b: int) -> int:
        compiled = router.lower(jax.ShapeDtypeStruct((b, *input_shape), jnp.float32)).compile()
        ma = compiled.memory_analysis()
        if ma is None:
            raise RuntimeError("this backend reports no memory analysis; give --batch-size instead")
        return (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
                + getattr(ma, "generated_code_size_in_bytes", 0))

    lo, hi = need(probes[0]), need(probes[1])
    per_sample = max(1.0, (hi - lo) / (probes[1] - probes[0]))
    fixed = lo - per_sample * probes[0]
    b = int((budget_bytes - fixed) // per_sample)
    if b < 1:
        raise ValueError(f"a memory budget of {budget_bytes / 2**20:.1f} MiB cannot hold one sample "
                         f"(needs about {(fixed + per_sample) / 2**20:.1f} MiB)")
    for _ in range(8):
        used = need(b)
        if used <= budget_bytes or b == 1:
            break
        b = max(1, min(b - 1, int(b * budget_bytes / used)))
    if need(b) > budget_bytes:
        raise ValueError(f"a memory budget of {budget_bytes / 2**20:.1f} MiB cannot hold one sample")
    return b


def parse_bytes(text: str) -> int:
    """'512MB', '2G', '1.5GiB', '1000000' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (examples: 512MB, 2GB)") from None


def shard_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.npz"


def _check_or_write_manifest(out: Path, manifest: dict, write: bool) -> None:
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("shard_size") != manifest["shard_size"]:
            raise ValueError(f"{out} was written with {old.get('shard_size')} images per shard, this run "
                             f"would use {manifest['shard_size']} (another device count?); use the same "
                             "devices, or another --out")
        if old.get("job") != manifest["job"] or old.get("layout") != manifest["layout"]:
            diff = {k: (old.get("job", {}).get(k), v) for k, v in manifest["job"].items()
                    if old.get("job", {}).get(k) != v}
            raise ValueError(f"{out} holds a job with different arguments {diff or '(gate layout)'}; "
                             "use another --out, or delete it to start over")
    elif write:
        atomic_write_text(path, json.dumps(manifest, indent=1))


def load_shards(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Concatenate every shard of a finished (or partial) job, in sample order."""
    out = Path(out)
    files = sorted(out.glob("shard-*.npz"))
    if not files:
        raise FileNotFoundError(f"no shards in {out}")
    parts: dict[str, list] = {}
    for f in files:
        with np.load(f) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(merged["index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def run_route_job(loaded, dataset: Dataset, out: str | os.PathLike, job: RouteJob, *,
                  progress: bool = True, process_index: int | None = None,
                  process_count: int | None = None, log: Callable[[str], Any] | None = None) -> dict:
    """Route ``dataset`` into shards under ``out``; resumable; returns the summary."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    spec: GateSpec = loaded.spec
    n = len(dataset.labels)
    n_dev = len(jax.local_devices())
    # Shards hold whole global batches: round the shard size up to a multiple.
    shard_size = -(-job.shard_size // (job.batch_size * n_dev)) * job.batch_size * n_dev
    n_shards = -(-n // shard_size)
    manifest = {
        "job": job.to_json(),
        "layout": spec.layout(),
        "cdrp_size": spec.size,
        "num_samples": n,
        "num_shards": n_shards,
        "shard_size": shard_size,
        "class_names": list(dataset.class_names),
        "model_meta": {"arch": loaded.meta.arch, "mean": list(loaded.meta.mean),
                       "std": list(loaded.meta.std), "num_classes": loaded.meta.num_classes},
        "format": "jaxroute-route-v1",
    }
    _check_or_write_manifest(out, manifest, write=(pi == 0))

    devices = jax.local_devices()
    global_batch = job.batch_size * len(devices)
    sharding = batch_sharding(devices)
    route = make_router(loaded, job.method, job.dgr, job.prune_frac)

    mine = [i for i in range(n_shards) if i % pc == pi]
    todo = [i for i in mine if not shard_path(out, i).exists()]
    n_todo = sum(min(shard_size, n - i * shard_size) for i in todo)
    if log is not None:
        log(f"routing {n_todo} of {n} images ({len(mine) - len(todo)} of my {len(mine)} shards already done) "
            f"on {len(devices)} local device(s), process {pi} of {pc}")
    bar = tqdm(total=n_todo, unit="img", disable=not progress, desc=f"route {job.method}")
    t_start, t_first, n_done, n_first = time.perf_counter(), None, 0, 0
    for i in todo:
        lo, hi = i * shard_size, min((i + 1) * shard_size, n)
        part = Dataset(dataset.images[lo:hi], dataset.labels[lo:hi], dataset.class_names, dataset.name)
        results: dict[str, list] = {}
        pending = None  # dispatch batch k+1 before fetching batch k: keeps the devices busy
        for bt in itertools.chain(batches(part, global_batch), [None]):  # lazily: a batch in memory at a time
            nxt = None
            if bt is not None:
                nxt = (route(shard_batch(bt.images, sharding)), bt.n_valid)
            if pending is not None:
                res, nv = pending
                res = jax.device_get(res)
                for k, v in res.items():
                    results.setdefault(k, []).append(np.asarray(v)[:nv])
                bar.update(nv)
                n_done += nv
                if t_first is None:  # the first batch includes compilation
                    t_first, n_first = time.perf_counter(), n_done
            pending = nxt
        arrays = {k: np.concatenate(v) for k, v in results.items()}
        arrays["index"] = np.arange(lo, hi, dtype=np.int64)
        arrays["label"] = np.asarray(dataset.labels[lo:hi], np.int64)
        atomic_save_npz(shard_path(out, i), **arrays)
    bar.close()
    t_end = time.perf_counter()
    steady = (n_done - n_first) / (t_end - t_first) if t_first and n_done > n_first else None
    timing = {"seconds": t_end - t_start, "routed_now": n_done,
              "images_per_s": steady if steady is not None else (n_done / (t_end - t_start) if n_done else None)}
    if pc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxroute-route-done")
    return summarize(out, spec, timing, write=(pi == 0))


def summarize(out: Path, spec: GateSpec, timing: dict | None = None, write: bool = True) -> dict:
    """Metrics over all shards of ``out`` (+ throughput of this run), written to summary.json."""
    manifest = json.loads((Path(out) / MANIFEST).read_text())
    s = load_shards(out)
    if len(s["index"]) != manifest["num_samples"] or np.any(np.diff(s["index"]) != 1):
        raise RuntimeError(f"{out}: shards hold {len(s['index'])} samples, manifest says "
                           f"{manifest['num_samples']} (job unfinished?)")
    m = routing_metrics(s["cdrp"], s["full_logits"], s["gated_logits"], s["label"], spec)
    m["fallback_fraction"] = float(np.mean(s["fell_back"]))
    m["method"] = manifest["job"]["method"]
    if timing:
        m.update(timing)
    if write:
        atomic_write_text(Path(out) / SUMMARY, json.dumps(m, indent=1))
    return m
