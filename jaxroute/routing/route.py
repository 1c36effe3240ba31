"""The one output type of every router (DGR, AWR, AAR, a decoupled model's controllers).

A router is a pure, jittable function ``router(model, x, *, config) -> Route``
over a :class:`~jaxroute.models.GatedModel` and a pixel-space image batch;
``config`` is the router's frozen (hashable, so static under ``jit``)
dataclass.  Every field of a :class:`Route` has the batch as leading axis.
"""
from __future__ import annotations

from typing import NamedTuple

import jax

from jaxroute.models.gates import GateSpec


class Route(NamedTuple):
    """Per-sample routing paths and what the network does along them."""

    cdrp: jax.Array          # (B, D) kept gates, forward order (the critical data routing path)
    loss: jax.Array          # (B,) the router's objective at the kept gates: distillation CE + γ‖Λ‖₁
    fell_back: jax.Array     # (B,) True where no candidate kept the top-1 (all ones kept)
    iterations: jax.Array    # (B,) int32: DGR the kept iterate t (0 = fallback); AWR/AAR pruning rounds survived;
                             # controller 0 (one forward pass)
    pred: jax.Array          # (B,) top-1 of the full model
    gated_pred: jax.Array    # (B,) top-1 with the kept gates
    gated_logits: jax.Array  # (B, K) logits with the kept gates
    full_logits: jax.Array   # (B, K) logits of the full model

    def gates(self, spec: GateSpec) -> dict:
        """The kept gates as a gate tree of (B, C) arrays."""
        return spec.split(self.cdrp)
