"""Ablation of critical nodes (DGR paper, Fig. 3).

For each sample, the critical nodes are the channels whose kept gate is > 0.
Deactivating a fraction f of them in the *full* model (gate 0 there, 1
everywhere else), either the top-valued (largest gates) or the
bottom-valued ones, and measuring top-1/top-5 accuracy against f shows
whether the gate values rank channels by importance: removing the top-valued
nodes should hurt much more.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


DEFAULT_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def ablation_mask(cdrp: jax.Array, fraction: float, order: str) -> jax.Array:
    """(B, D) gates: 0 on the ``fraction`` top/bottom-valued critical nodes, else 1."""
    if order not in ("top", "bottom"):
        raise ValueError(f"order must be 'top' or 'bottom', got {order!r}")
    critical = cdrp > 0
    n_crit = critical.sum(-1, keepdims=True)
    n_off = jnp.round(fraction * n_crit)
    # Rank critical nodes by value (descending for "top"); non-critical go last.
    key = jnp.where(critical, -cdrp if order == "top" else cdrp, jnp.inf)
    rank = jnp.argsort(jnp.argsort(key, axis=-1), axis=-1)
    return jnp.where(critical & (rank < n_off), 0.0, 1.0).astype(cdrp.dtype)


def ablation_curve(model, x, labels, cdrp, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   order: str = "top") -> dict:
    """Top-1/top-5 accuracy of the full model (a GatedModel) with a fraction of critical nodes removed."""
    labels = jnp.asarray(labels)

    @jax.jit
    def acc(x, cdrp, labels, f):
        g = ablation_mask(cdrp, f, order)
        logits = model.logits(x, g)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return jnp.sum(top5[:, 0] == labels), jnp.sum(jnp.any(top5 == labels[:, None], -1))

    t1, t5 = [], []
    for f in fractions:
        a1, a5 = acc(x, cdrp, labels, float(f))
        t1.append(float(a1) / len(labels))
        t5.append(float(a5) / len(labels))
    return {"fractions": list(map(float, fractions)), "order": order, "top1": t1, "top5": t5}
