"""Data-parallel placement of image batches over the local JAX devices.

Samples are independent in every routing method and attack, so a batch
split over devices needs no communication: jit the function once, put its
input with :func:`shard_batch`, and XLA runs one slice per device.

On a CPU, XLA's default is ONE device whose operations are each split over
all cores; many small convolutions then spend much of their time
synchronising threads.  One device per core, each running its share of the
batch, routed ResNet-20 with DGR at 26.90 images/s against 16.52 (batch 128,
2-core AMD EPYC; ``python -m benchmarks.routing``, ``benchmarks/README.md``).
:func:`cpu_devices_per_core` sets
that up; it must run before JAX starts its backends.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from jaxroute.utils.checks import check_int
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def cpu_devices_per_core(n: int | None = None) -> int:
    """Ask JAX for ``n`` CPU devices (default: ``JAXROUTE_CPU_DEVICES`` or the core count).

    Call it right after ``import jax``, before any computation; later it
    raises a RuntimeError saying so.  It only affects the CPU backend (a GPU
    or TPU keeps its devices).  Returns the count requested.
    """
    if n is None:
        n = int(os.environ.get("JAXROUTE_CPU_DEVICES") or os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"need at least one CPU device, got {n}")
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return n  # the user chose explicitly through XLA_FLAGS; that wins
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:
        raise RuntimeError(
            "cpu_devices_per_core() must be called before JAX runs anything (right after "
            f"`import jax`); JAX has already started with {jax.local_device_count()} device(s)") from e
    return n


def batch_sharding(devices: Sequence[jax.Device] | None = None) -> NamedSharding:
    """Sharding that splits axis 0 (the batch) over ``devices`` (default: all local devices)."""
    devs = list(jax.local_devices() if devices is None else devices)
    return NamedSharding(Mesh(np.array(devs), ("batch",)), P("batch"))


def shard_batch(x, sharding: NamedSharding | None = None) -> jax.Array:
    """Put a batch on the devices of ``sharding`` (default :func:`batch_sharding`), split on axis 0.

    The batch must divide evenly: pad it (:func:`map_batches` and the
    extraction job do) rather than let XLA pick uneven shards.
    """
    sharding = batch_sharding() if sharding is None else sharding
    n = sharding.mesh.size
    if x.shape[0] % n:
        raise ValueError(f"a batch of {x.shape[0]} cannot be split evenly over {n} devices; "
                         f"use a multiple of {n}")
    return jax.device_put(x, sharding)


def map_batches(fn, arrays: Sequence, batch_size: int):
    """Run ``fn`` over fixed-shape batches of ``arrays``, split over the local devices; keep the real rows.

    ``arrays`` share a leading axis N (an entry may be None: passed through as
    None).  ``fn(batch_index, *batch_arrays)`` returns a pytree of arrays whose
    leading axis is ``batch_size * r`` -- r outputs per input row, sample-major
    (r = 1 for routing and most attacks, k for the ensemble attack).  Every
    batch has ``batch_size`` rows so a jitted ``fn`` compiles once: the last one
    repeats its last real row (in-distribution, so value checks pass), and the
    rows it adds are dropped from the result.  Batches are split over all local
    devices when ``batch_size`` is a multiple of their count (the fast setup on
    a CPU, :func:`cpu_devices_per_core`), else they run on the default device.
    ``batch_index`` lets ``fn`` derive per-batch PRNG keys (``jax.random.fold_in``).
    Returns the pytree of concatenated numpy arrays.
    """
    arrays = [None if a is None else np.asarray(a) for a in arrays]
    present = [a for a in arrays if a is not None]
    if not present:
        raise ValueError("map_batches needs at least one array")
    n = len(present[0])
    if any(len(a) != n for a in present):
        raise ValueError(f"arrays differ in length: {[len(a) for a in present]}")
    check_int(batch_size, "batch_size")
    sharding = batch_sharding() if batch_size % jax.local_device_count() == 0 else None
    outs = []
    for i, lo in enumerate(range(0, n, batch_size)):
        nv = min(batch_size, n - lo)
        batch = []
        for a in arrays:
            if a is None:
                batch.append(None)
                continue
            b = a[lo:lo + batch_size]
            if nv < batch_size:
                b = np.concatenate([b, np.repeat(b[-1:], batch_size - nv, axis=0)])
            batch.append(shard_batch(b, sharding) if sharding is not None else b)
        res = jax.device_get(fn(i, *batch))
        outs.append(jax.tree.map(lambda v: np.asarray(v)[: nv * (np.shape(v)[0] // batch_size)], res))
    return jax.tree.map(lambda *vs: np.concatenate(vs), *outs)
