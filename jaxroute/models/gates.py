"""Gate trees: per-channel multipliers on every gate point of a model.

A *gate tree* is a dict ``{gate_point_name: array}``; each array has shape
``(C,)`` (shared by the batch) or ``(B, C)`` (one gate vector per sample),
where ``C`` is the channel count of that gate point.  ``None`` everywhere in
the library means "all ones", i.e. the ungated network.

JAX sorts dict keys when it flattens a pytree, so the *forward order* of the
gate points (the order of the CDRP vector in the DGR paper) cannot be read
from a dict.  :class:`GateSpec` records it explicitly; every conversion
between a gate tree and the flat CDRP vector goes through a spec.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

GateTree = dict  # {name: (C,) or (B, C) array}


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """Names and channel counts of a model's gate points, in forward order."""

    names: tuple[str, ...]
    channels: tuple[int, ...]

    def __post_init__(self):
        if len(self.names) != len(self.channels):
            raise ValueError("GateSpec: names and channels differ in length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"GateSpec: duplicate gate names in {self.names}")

    @property
    def size(self) -> int:
        """Length of the flat CDRP vector (sum of all channel counts)."""
        return int(sum(self.channels))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start offset of each gate point in the flat vector."""
        return tuple(int(o) for o in np.cumsum((0,) + self.channels[:-1]))

    def __len__(self) -> int:
        return len(self.names)

    def check_points(self, points) -> tuple[str, ...]:
        """``points`` (one name or several) as a tuple, each checked to be one of these gate points."""
        points = (points,) if isinstance(points, str) else tuple(points)
        if not points:
            raise ValueError("need at least one gate point")
        unknown = [p for p in points if p not in self.names]
        if unknown:
            raise ValueError(f"unknown gate point {unknown[0]!r}; the model's gate points: {list(self.names)}")
        return points

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(zip(self.names, self.channels))

    def layout(self) -> list[dict]:
        """JSON-friendly layout: name, channels, offset of every gate point."""
        return [
            {"name": n, "channels": c, "offset": o}
            for n, c, o in zip(self.names, self.channels, self.offsets)
        ]

    def layer_index(self) -> np.ndarray:
        """(D,) int array: the gate-point index of every CDRP entry."""
        return np.repeat(np.arange(len(self.names)), self.channels)

    def split(self, flat) -> dict:
        """Cut a flat CDRP (..., D) into ``{gate_point: (..., C)}`` in forward order.

        Works on numpy and JAX arrays alike (plain slicing): the one place a
        flat path is cut into layers.
        """
        d = np.shape(flat)[-1]
        if d != self.size:
            raise ValueError(f"flat gate vector has {d} entries, the model's CDRP has {self.size} "
                             f"({len(self)} gate points)")
        return {n: flat[..., o : o + c] for n, c, o in zip(self.names, self.channels, self.offsets)}


def gate_shape_problem(name: str, shape: tuple, channels: int, batch: int | None = None) -> str | None:
    """None if a gate of ``shape`` fits a point of ``channels`` channels, else what is wrong."""
    shape = tuple(shape)
    if shape == (channels,) or (len(shape) == 2 and shape[1] == channels and batch in (None, shape[0])):
        return None
    return f"{name!r}: got shape {shape}, expected ({channels},) or ({'B' if batch is None else batch}, {channels})"


def check_gates(spec: GateSpec, gates: Mapping | None, batch: int | None = None) -> None:
    """Raise a ValueError naming every mismatch between a gate tree and ``spec``.

    The one validator of gate trees: the models call it at the end of each
    forward pass (shapes are static under ``jit``, so it costs nothing at run
    time).
    """
    if gates is None:
        return
    if not isinstance(gates, Mapping):
        raise TypeError(
            f"gates must be a dict {{gate_point: array}} or None, got {type(gates).__name__}"
        )
    expected = dict(zip(spec.names, spec.channels))
    lines = [f"missing gate point {n!r} ({c} channels)" for n, c in spec if n not in gates]
    unexpected = [n for n in gates if n not in expected]
    if unexpected:
        lines.append(f"unexpected gate points {unexpected}")
    misshaped = [p for n, g in gates.items() if n in expected
                 for p in [gate_shape_problem(n, np.shape(g), expected[n], batch)] if p]
    if misshaped:
        lines.append("wrong shape: " + "; ".join(misshaped))
    if lines:
        raise ValueError("gate tree does not match the model's gate points:\n  " + "\n  ".join(lines)
                         + f"\n  the model's {len(spec)} gate points, in forward order: {list(expected.items())}")


def ones_gates(spec: GateSpec, batch: int | None = None, dtype=jnp.float32) -> GateTree:
    """All-ones gate tree: ``(C,)`` per point, or ``(batch, C)`` if batch is given."""
    lead = () if batch is None else (batch,)
    return {n: jnp.ones(lead + (c,), dtype) for n, c in spec}


def flatten_gates(spec: GateSpec, gates: Mapping) -> jax.Array:
    """Concatenate a gate tree in forward order: (D,) or (B, D) -- the CDRP layout."""
    check_gates(spec, gates)
    return jnp.concatenate([jnp.asarray(gates[n]) for n in spec.names], axis=-1)


def unflatten_gates(spec: GateSpec, flat) -> GateTree:
    """Inverse of :func:`flatten_gates` for a (D,) or (B, D) array."""
    return spec.split(jnp.asarray(flat))


def apply_gate(x: jax.Array, g: jax.Array | None) -> jax.Array:
    """Multiply channel-last activations ``x`` (B, ..., C) by a gate (C,) or (B, C)."""
    if g is None:
        return x
    g = g.astype(x.dtype)
    if g.ndim == 2:  # per-sample gates: broadcast over the spatial axes
        g = g.reshape(g.shape[:1] + (1,) * (x.ndim - 2) + g.shape[1:])
    return x * g
