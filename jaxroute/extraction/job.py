"""The extraction job: run a per-sample function over a data set into resumable numpy shards.

Any per-sample output goes through this one job: routing paths (CDRPs),
per-layer pooled features, saliency maps, unit activations.  Output
directory::

    manifest.json      what determines the output (``job``: the caller's
                       description -- model, weights, data, method and its
                       hyper-parameters), the batch plan, sample count,
                       class names, and the caller's ``extra`` facts
    shard-00000.npz    one per ``shard_size`` samples, plain numpy: ``index``,
                       ``label``, ``input_crc32`` (CRC-32 of the shard's input
                       pixels, float32) and every array the function returns

Every file is written atomically (temp file + rename), so a job killed at any
moment leaves only complete shards; started again with the same arguments it
skips them and computes the rest.  Results are deterministic for a fixed
compiled batch shape and shard boundaries are fixed, so the final output
equals an uninterrupted run's.  A manifest written by different arguments is
refused, naming what differs, rather than mixed; so is a resume whose input
images differ from those a finished shard was computed from (its
``input_crc32`` is checked against the data before any work).

Parallelism: ``plan.batch_size`` is the batch *per device*; a global batch of
``batch_size * local devices`` is split over all local JAX devices
(data-parallel; samples are independent, so no communication).  Every device
runs the same compiled shape whatever the device count, which keeps results
bit-identical between 1 and N devices as long as the conv formulation is the
same (on a CPU, :mod:`jaxroute.utils.conv_grads` pairs narrow convs only when
each device has one core; the manifest records the formulation and a resume
with another one is refused).  Several processes (``jax.distributed``)
each take the shards ``i % process_count == process_index``.
"""
from __future__ import annotations

import itertools
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np

from jaxroute.data import Batch, Dataset, batches
from jaxroute.data.core import _pad_rows
from jaxroute.data.stored import read_rows, unit_float
from jaxroute.extraction.plan import BatchPlan
from jaxroute.utils import conv_grads
from jaxroute.utils.devices import batch_sharding, shard_batch
from jaxroute.utils.io import atomic_save_npz, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = "jaxroute-extract-v1"

# fn(images (B, H, W, C), labels (B,) int32 (-1 where unknown), index (B,) int64) -> {name: (B, ...) array}
SampleFn = Callable[[jax.Array, jax.Array, jax.Array], Mapping[str, jax.Array]]


class ExtractionResult(NamedTuple):
    out: Path
    manifest: dict
    computed: int              # samples computed by this call (0 when every shard existed)
    seconds: float
    samples_per_s: float | None  # steady rate of this call, after the first (compiling) batch
    # samples per second of waiting for input batches / of computing (dispatch + fetch), after the
    # first batch: the lower one limits the job (input-bound when it is the input rate)
    input_per_s: float | None = None
    compute_per_s: float | None = None


def shard_path(out: Path, i: int) -> Path:
    return Path(out) / f"shard-{i:05d}.npz"


def load_manifest(out: str | os.PathLike) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not an extraction output (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt manifest {path}: {e}") from e


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: output has {a!r}, this run {b!r}")
    return out


def _check_or_write_manifest(out: Path, manifest: dict, write: bool) -> None:
    path = out / MANIFEST
    if path.exists():
        old = load_manifest(out)
        keys = ("format", "job", "plan", "num_samples", "extra")
        diff = _differences({k: old.get(k) for k in keys}, {k: manifest.get(k) for k in keys})
        if diff:
            raise ValueError(f"{out} holds the output of another job; refusing to mix them ("
                             + "; ".join(diff) + "); use another --out, or delete it to start over")
    elif write:
        atomic_write_text(path, json.dumps(manifest, indent=1))


def _crc_rows(x: np.ndarray, crc: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(x, np.float32).data, crc)


def _check_inputs_unchanged(out: Path, dataset: Dataset, done: list[int], plan: BatchPlan) -> None:
    """Refuse a resume whose input images differ from those the finished shards were computed from."""
    checked = []
    for i in done:
        with np.load(shard_path(out, i)) as z:
            stored = int(z["input_crc32"]) if "input_crc32" in z.files else None
        if stored is not None:
            checked.append((i, stored))
    ranges = [(i * plan.shard_size, min((i + 1) * plan.shard_size, len(dataset.images))) for i, _ in checked]
    # a grain-decoded data set checks all finished shards through one pipeline
    stream = (dataset.images.iter_ranges(ranges, plan.global_batch)
              if hasattr(dataset.images, "iter_ranges") and ranges else None)
    for (i, stored), (lo, hi) in zip(checked, ranges):
        crc = 0
        for a in range(lo, hi, plan.global_batch):
            rows = (read_rows(dataset.images[a:min(a + plan.global_batch, hi)]) if stream is None
                    else unit_float(next(stream)))
            crc = _crc_rows(rows, crc)
        if crc != stored:
            raise ValueError(f"the input images changed since {shard_path(out, i).name} was written (CRC-32 "
                             f"{crc:#010x}, shard records {stored:#010x}); refusing to mix outputs of different "
                             "data: use another --out, or delete it to start over")


def _shard_batches(dataset: Dataset, labels: np.ndarray, todo: list[int], plan: BatchPlan, n: int):
    """``(shard, lo, hi, iterator of Batch)`` for each shard to compute, in order.

    A grain-decoded data set (``images.iter_ranges``) streams the rows of all of
    this process's remaining shards through ONE pipeline, so its decode workers
    start once and run ahead across shard boundaries; other data sets are read
    per shard.  Either way each shard's batches are ``plan.global_batch`` rows,
    its last one padded.
    """
    ranges = [(i * plan.shard_size, min((i + 1) * plan.shard_size, n)) for i in todo]
    stream = (dataset.images.iter_ranges(ranges, plan.global_batch)
              if hasattr(dataset.images, "iter_ranges") and ranges else None)
    for i, (lo, hi) in zip(todo, ranges):
        if stream is None:
            part = Dataset(dataset.images[lo:hi], labels[lo:hi], dataset.class_names, dataset.name)
            yield i, lo, hi, batches(part, plan.global_batch)
        else:
            yield i, lo, hi, _padded(stream, labels, lo, hi, plan.global_batch)


def _padded(stream, labels: np.ndarray, lo: int, hi: int, size: int):
    for a in range(lo, hi, size):
        x = unit_float(next(stream))
        y = labels[a:a + len(x)]
        nv = len(x)
        if nv < size:
            x, y = _pad_rows(x, size), _pad_rows(y, size)
        yield Batch(x, y, nv)


def load_shards(out: str | os.PathLike) -> dict[str, np.ndarray]:
    """Concatenate the per-sample arrays of every shard of a finished (or partial) job, in sample order.

    Per-shard scalars (``input_crc32``) are not per-sample and are left out.
    """
    out = Path(out)
    files = sorted(out.glob("shard-*.npz"))
    if not files:
        raise FileNotFoundError(f"no shards in {out}")
    parts: dict[str, list] = {}
    for f in files:
        with np.load(f) as z:
            for k in z.files:
                if z[k].ndim:
                    parts.setdefault(k, []).append(z[k])
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(merged["index"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def run_extraction(fn: SampleFn, dataset: Dataset, out: str | os.PathLike, *, job: Mapping[str, Any],
                   plan: BatchPlan, extra: Mapping[str, Any] | None = None, progress: bool = True,
                   desc: str = "extract", process_index: int | None = None, process_count: int | None = None,
                   log: Callable[[str], Any] | None = None) -> ExtractionResult:
    """Run ``fn`` over ``dataset`` into shards under ``out``; resumable.

    ``fn(images, labels, index) -> {name: per-sample array}``, jitted, called
    on global batches of ``plan.global_batch`` samples split over the local
    devices (labels are -1 where the data set has none).  ``job`` (JSON-able)
    is everything that determines the output: compared on resume, together
    with ``plan``, the sample count and ``extra``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    devices = jax.local_devices()
    if plan.devices != len(devices):
        raise ValueError(f"the batch plan is for {plan.devices} devices, this process has {len(devices)}")
    n = len(dataset.images)
    labels = (np.full(n, -1, np.int32) if dataset.labels is None else np.asarray(dataset.labels, np.int32))
    n_shards = plan.num_shards(n)
    manifest = {
        "format": FORMAT,
        "job": json.loads(json.dumps(dict(job))),
        # the compiled per-device batch, the shard boundaries and the conv formulation determine
        # the output; the device count itself does not (every device runs the same compiled
        # shape), so it is recorded, not compared -- except through the formulation, which on a
        # CPU depends on it (column pairing when each device has one core)
        "plan": {"batch_size": plan.batch_size, "shard_size": plan.shard_size,
                 "conv_formulation": conv_grads.formulation()},
        "devices": plan.devices,
        "num_samples": n,
        "num_shards": n_shards,
        "class_names": list(dataset.class_names),
        "extra": json.loads(json.dumps(dict(extra or {}))),
    }
    if dataset.info is not None:  # how the pixels were made (preprocessing, files left out): part of the output
        manifest["extra"]["input"] = json.loads(json.dumps(dict(dataset.info)))
    _check_or_write_manifest(out, manifest, write=(pi == 0))

    sharding = batch_sharding(devices)
    mine = [i for i in range(n_shards) if i % pc == pi]
    todo = [i for i in mine if not shard_path(out, i).exists()]
    _check_inputs_unchanged(out, dataset, [i for i in mine if i not in todo], plan)
    n_todo = sum(min(plan.shard_size, n - i * plan.shard_size) for i in todo)
    if log is not None:
        log(f"{desc}: {n_todo} of {n} samples to compute ({len(mine) - len(todo)} of this process's "
            f"{len(mine)} shards done) on {len(devices)} local device(s), process {pi} of {pc}")
    bar = tqdm(total=n_todo, unit="img", disable=not progress, desc=desc)
    t_start, t_first, n_done, n_first = time.perf_counter(), None, 0, 0
    t_input = t_compute = 0.0  # after the first batch: seconds waiting for input / computing
    for i, lo, hi, shard_batches in _shard_batches(dataset, labels, todo, plan, n):
        index = np.arange(lo, hi, dtype=np.int64)
        results: dict[str, list] = {}
        crc = 0
        pending = None  # dispatch batch k+1 before fetching batch k: keeps the devices busy
        source = itertools.chain(shard_batches, [None])
        for k in itertools.count():
            t0 = time.perf_counter()
            bt = next(source)  # batches are read lazily: one (plus the pipeline's prefetch) in memory
            t1 = time.perf_counter()
            nxt = None
            if bt is not None:
                crc = _crc_rows(bt.images[:bt.n_valid], crc)
                idx = index[k * plan.global_batch:(k + 1) * plan.global_batch]
                idx = np.concatenate([idx, np.repeat(idx[-1:], plan.global_batch - len(idx))])
                args = [shard_batch(np.asarray(a), sharding) for a in (bt.images, bt.labels, idx)]
                nxt = (fn(*args), bt.n_valid)
            if pending is not None:
                res, nv = pending
                for name, v in jax.device_get(res).items():
                    results.setdefault(name, []).append(np.asarray(v)[:nv])
                bar.update(nv)
                n_done += nv
                if t_first is None:  # the first batch includes compilation
                    t_first, n_first = time.perf_counter(), n_done
                else:
                    t_input += t1 - t0
                    t_compute += time.perf_counter() - t1
                    if t_input > 0 and t_compute > 0:
                        done = n_done - n_first
                        bar.set_postfix_str(f"input {done / t_input:.0f} img/s, compute {done / t_compute:.0f} img/s",
                                            refresh=False)
            pending = nxt
            if bt is None:
                break
        arrays = {name: np.concatenate(v) for name, v in results.items()}
        for reserved in ("index", "label", "input_crc32"):
            if reserved in arrays:
                raise ValueError(f"the per-sample function returned {reserved!r}, which the job writes itself")
        atomic_save_npz(shard_path(out, i), index=index, label=labels[lo:hi].astype(np.int64),
                        input_crc32=np.uint32(crc), **arrays)
    bar.close()
    t_end = time.perf_counter()
    steady = (n_done - n_first) / (t_end - t_first) if t_first and n_done > n_first else None
    if steady is None and n_done:
        steady = n_done / (t_end - t_start)
    if pc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxroute-extraction-done")
    steady_n = n_done - n_first
    input_rate = steady_n / t_input if t_input > 0 else None
    compute_rate = steady_n / t_compute if t_compute > 0 else None
    if log is not None and input_rate and compute_rate:
        limit = "input" if input_rate < compute_rate else "compute"
        log(f"{desc}: input {input_rate:.1f} images/s, compute {compute_rate:.1f} images/s ({limit}-bound)")
    return ExtractionResult(out, manifest, n_done, t_end - t_start, steady, input_rate, compute_rate)
