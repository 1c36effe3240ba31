"""Adaptive Weight Routing (AWR) and Adaptive Activation Routing (AAR).

The pruning baselines of the DGR paper (Sec. 4.1): starting from the full
network, each iteration removes, in every gate layer, the 2% lowest-ranked
channels that are still active (after iteration i a layer of C channels has
round(0.02*C*i) pruned, so every layer loses 2% per iteration on average even
when 2% of it is less than one channel), ranked by the l1 norm of the channel's weights (AWR) or of its
activation in the current, already pruned network (AAR).  Pruning stops for
a sample when its top-1 prediction changes; the kept path is the last mask
that still gave the original prediction (the same selection criterion as
DGR).  Gates are binary.

Batched like DGR: every sample has its own (B, D) mask; one forward pass per
iteration serves every sample (and, for AAR, also yields the activations
used to rank the next iteration); samples that stopped keep their mask.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.models.base import flax_path
from jaxroute.models.gates import GateSpec, flatten_gates, unflatten_gates

CaptureFn = Callable[[dict, jax.Array], tuple[jax.Array, dict]]


class PruneResult(NamedTuple):
    cdrp: jax.Array        # (B, D) binary mask kept (the routing path)
    iterations: jax.Array  # (B,) pruning iterations survived
    pred: jax.Array        # (B,) full-model top-1
    gated_pred: jax.Array  # (B,) top-1 with the kept mask
    gated_logits: jax.Array
    full_logits: jax.Array




def weight_l1_scores(params: dict, spec: GateSpec) -> jax.Array:
    """(D,) l1 norm of the weights that produce each gated channel.

    A gate point named after a conv/linear layer uses that layer's kernel; a
    residual block's output (e.g. ``layer1.0``) uses the block's last conv,
    whose output the residual sum carries.
    """
    out = []
    for name, c in spec:
        node = params
        for p in flax_path(name):
            if p not in node:
                raise ValueError(f"AWR: no parameters for gate point {name!r} (looked for {p!r})")
            node = node[p]
        if "kernel" not in node:
            convs = sorted(k for k in node if k.startswith("conv") and "kernel" in node[k])
            if not convs:
                raise ValueError(f"AWR: cannot find the layer producing gate point {name!r}")
            node = node[convs[-1]]
        k = jnp.asarray(node["kernel"])
        s = jnp.sum(jnp.abs(k), axis=tuple(range(k.ndim - 1)))
        if s.shape != (c,):
            raise ValueError(f"AWR: kernel of {name!r} has {s.shape[0]} outputs, gate point has {c}")
        out.append(s)
    return jnp.concatenate(out)


def activation_l1_scores(acts: dict, spec: GateSpec) -> jax.Array:
    """(B, D) mean |activation| of every channel at every gate point."""
    return flatten_gates(spec, {n: jnp.mean(jnp.abs(a), axis=tuple(range(1, a.ndim - 1)))
                                for n, a in acts.items()})


def _prune_to(mask, scores, spec: GateSpec, frac: float, it):
    """Prune the lowest-scored active channels until each layer has round(frac*C*it) pruned."""
    # Pruned channels sort first, then active ones by ascending score.
    key = jnp.where(mask > 0, scores, -jnp.inf)
    new = []
    for c, o in zip(spec.channels, spec.offsets):
        n_pruned = jnp.minimum(jnp.round(frac * c * it), c)[:, None]  # it: (B,)
        rank = jnp.argsort(jnp.argsort(key[:, o : o + c], axis=-1), axis=-1)
        new.append(jnp.where(rank < n_pruned, 0.0, mask[:, o : o + c]))
    return jnp.concatenate(new, axis=-1)


def prune_route(capture_fn: CaptureFn, spec: GateSpec, x: jax.Array, method: str,
                weight_scores: jax.Array | None = None, frac: float = 0.02,
                max_iters: int | None = None) -> PruneResult:
    """AWR (``method="awr"``, needs ``weight_scores`` (D,)) or AAR (``"aar"``).

    ``capture_fn(gates, x) -> (logits, {gate_point: activation})``.  Pure, jittable.
    """
    if method not in ("awr", "aar"):
        raise ValueError(f"method must be 'awr' or 'aar', got {method!r}")
    if method == "awr" and weight_scores is None:
        raise ValueError("AWR needs weight_scores (see weight_l1_scores)")
    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    b, d = x.shape[0], spec.size
    iters = max_iters if max_iters is not None else math.ceil(1 / frac)
    ones = jnp.ones((b, d), x.dtype)
    full_logits, acts = capture_fn(unflatten_gates(spec, ones), x)
    pred = jnp.argmax(full_logits, -1)

    def scores_of(acts):
        if method == "aar":
            return activation_l1_scores(acts, spec)
        return jnp.broadcast_to(weight_scores, (b, d))

    def body(carry, _):
        mask, logits, scores, active, n = carry
        cand = _prune_to(mask, scores, spec, frac, n + 1)
        cl, cacts = capture_fn(unflatten_gates(spec, cand), x)
        ok = active & (jnp.argmax(cl, -1) == pred)
        mask = jnp.where(ok[:, None], cand, mask)
        logits = jnp.where(ok[:, None], cl, logits)
        scores = jnp.where(ok[:, None], scores_of(cacts), scores)
        return (mask, logits, scores, ok, n + ok), None

    init = (ones, full_logits, scores_of(acts), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32))
    (mask, logits, _, _, n), _ = jax.lax.scan(body, init, None, length=iters)
    return PruneResult(mask, n, pred, jnp.argmax(logits, -1), logits, full_logits)
