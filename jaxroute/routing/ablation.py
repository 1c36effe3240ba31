"""Ablation of critical nodes (DGR paper, Fig. 3).

For each sample, the critical nodes are the channels whose kept gate is > 0.
Deactivating a fraction f of them in the *full* model (gate 0 there, 1
everywhere else), either the top-valued (largest gates) or the
bottom-valued ones, and measuring top-1/top-5 accuracy against f shows
whether the gate values rank channels by importance: removing the top-valued
nodes should hurt much more.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.models.gates import GateSpec, unflatten_gates

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


def ablation_curve(logits_fn: Callable, spec: GateSpec, x, labels, cdrp,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS, order: str = "top") -> dict:
    """Top-1/top-5 accuracy of the full model with a fraction of critical nodes removed."""
    labels = jnp.asarray(labels)

    @jax.jit
    def acc(x, cdrp, labels, f):
        g = ablation_mask(cdrp, f, order)
        logits = logits_fn(unflatten_gates(spec, g), x)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return jnp.sum(top5[:, 0] == labels), jnp.sum(jnp.any(top5 == labels[:, None], -1))

    t1, t5 = [], []
    for f in fractions:
        a1, a5 = acc(x, cdrp, labels, float(f))
        t1.append(float(a1) / len(labels))
        t5.append(float(a5) / len(labels))
    return {"fractions": list(map(float, fractions)), "order": order, "top1": t1, "top5": t5}


def plot_ablation(curves: Sequence[dict], path, title: str = "Ablation of critical nodes") -> None:
    """Save Fig.-3-style curves (accuracy versus fraction deactivated) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("top1", "top5")):
        for c in curves:
            ax.plot(c["fractions"], c[metric], marker="o", label=c.get("label", c["order"]))
        ax.set_xlabel("fraction of critical nodes deactivated")
        ax.set_ylabel(f"{metric} accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
