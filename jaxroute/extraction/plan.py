"""Batch and shard planning: how many samples run at once, how many go into a shard.

The per-device batch is the compiled shape of every jitted per-sample
function; a global batch is that times the local device count; a shard holds
whole global batches.  One function plans all three, so the CLI, the jobs
and the experiments agree on them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxroute.utils.checks import check_int


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    batch_size: int    # samples per device per step (the compiled shape)
    devices: int       # local devices a global batch is split over
    shard_size: int    # samples per output shard (a multiple of the global batch)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.devices

    def num_shards(self, n: int) -> int:
        return -(-n // self.shard_size)


def plan_batches(n: int, batch_size: int, shard_size: int, devices: int | None = None) -> BatchPlan:
    """Plan ``n`` samples into per-device batches and shards.

    * A data set smaller than one global batch runs at the per-device batch
      it fills (padding a batch it cannot fill is wasted work).
    * The shard size is rounded up to a multiple of the global batch.
    """
    devices = jax.local_device_count() if devices is None else devices
    batch_size, shard_size, devices = (check_int(v, name) for name, v in
                                       (("batch_size", batch_size), ("shard_size", shard_size), ("devices", devices)))
    if n < 1:
        raise ValueError(f"nothing to do: the data set has {n} samples")
    fill = -(-n // devices)
    batch_size = min(batch_size, fill)
    global_batch = batch_size * devices
    return BatchPlan(batch_size, devices, -(-shard_size // global_batch) * global_batch)


def batch_size_for_memory(fn, input_shape, budget_bytes: int, probes=(8, 32)) -> int:
    """Largest per-device batch whose compiled program ``fn`` (jitted, one image batch in) fits ``budget_bytes``.

    Compiles ``fn`` at two batch sizes, reads XLA's memory analysis
    (temporaries + arguments + outputs; weights are constants of the program
    and counted too), extrapolates linearly, then compiles the chosen size to
    check it -- XLA's buffer assignment is only roughly affine in the batch --
    and shrinks it until it fits.
    """

    def need(b: int) -> int:
        compiled = fn.lower(jax.ShapeDtypeStruct((b, *input_shape), jnp.float32)).compile()
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
        value = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise ValueError(f"cannot read a memory size from {text!r} (examples: 512MB, 2GB)") from None
    if not value >= 1 or value == float("inf"):
        raise ValueError(f"a memory size must be a positive number of bytes, got {text!r}")
    return int(value)
