"""Local intrinsic dimensionality (Ma et al., ICLR 2018), as in Lee et al.'s reference code.

Maximum-likelihood estimate from the distances r_1 ≤ … ≤ r_k of a query to
its k nearest neighbours in a reference set:

    LID(x) = −( (1/k) Σ_i log(r_i / r_k) )⁻¹.

Protocol (``get_LID`` of ``pokaxpoka/deep_Mahalanobis_detector``): per layer,
pooled features; mini-batches of 100 images; the reference set of every
query — clean, adversarial or noisy — is the *clean* mini-batch it belongs
to; k ∈ {10, 20, …, 90} (the logistic regression's validation picks k); the
layer estimates form the detector's features.

Neighbour rule.  A clean query is a member of its own reference batch, so
its nearest "neighbour" is itself at distance 0 and must be dropped.  An
adversarial or noisy query is not a member, so its first k neighbours
count.  The reference code drops the first neighbour of every query
(``np.sort(…)[:, 1:k+1]``), adversarial ones included: ``drop_first="all"``
reproduces that; the default ``drop_first="self"`` drops it only for clean
queries (Ma et al.'s definition).  Reports state which rule they used.
When a batch has fewer than k + 1 images, k shrinks to len(batch) − 1, as
in the reference code; a last mini-batch of fewer than three images joins
the one before it (with one or two images k would shrink to 0 or 1, and the
ratio of a single neighbour distance to itself gives no estimate: the
reference code returns inf there).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.utils.checks import check_int

LID_KS = tuple(range(10, 100, 10))
DROP_RULES = ("self", "all")
MIN_BATCH = 3  # images in a mini-batch: k <= len - 1 must be >= 2 for the MLE to be defined


@dataclasses.dataclass(frozen=True)
class LIDConfig:
    """Neighbour counts, mini-batch size and the neighbour rule (see the module doc)."""

    ks: tuple[int, ...] = LID_KS
    batch_size: int = 100
    drop_first: str = "self"

    def __post_init__(self):
        ks = tuple(self.ks)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise ValueError(f"LID ks must be a non-empty list of integers >= 1, got {ks!r}")
        object.__setattr__(self, "ks", tuple(int(k) for k in ks))
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "LID batch_size", MIN_BATCH))
        if self.drop_first not in DROP_RULES:
            raise ValueError(f"LID drop_first must be one of {DROP_RULES}, got {self.drop_first!r}")


def lid_mle(reference: jax.Array, queries: jax.Array, k: int, drop_first: bool) -> jax.Array:
    """LID estimates (Q,) of ``queries`` (Q, D) against ``reference`` (R, D); k static.

    ``drop_first`` skips each query's nearest neighbour (the query itself
    when it belongs to the reference set).  k is capped at R − 1 as in the
    reference code.  Pure and jittable.
    """
    k = min(int(k), reference.shape[0] - 1)
    d = jnp.sqrt(jnp.sum((queries[:, None, :] - reference[None]) ** 2, axis=-1))   # exact differences
    start = 1 if drop_first else 0
    r = jnp.sort(d, axis=1)[:, start:start + k]
    return -k / jnp.sum(jnp.log(r / r[:, -1:]), axis=1)


def lid_features(clean: Sequence, others: Sequence[Sequence] = (), config: LIDConfig = LIDConfig()):
    """LID characteristics of clean images and of their twins, per layer and k.

    ``clean``: per-layer features [(N, C_l)] of the clean images; ``others``:
    the same for each twin set (adversarial, noisy), aligned with ``clean``.
    Returns one (N, L, len(ks)) array for ``clean`` and one per twin set, each
    query scored against the clean mini-batch of ``config.batch_size`` rows
    it falls in.
    """
    clean = [np.asarray(f, np.float32).reshape(len(f), -1) for f in clean]
    others = [[np.asarray(f, np.float32).reshape(len(f), -1) for f in o] for o in others]
    n = len(clean[0])
    for o in others:
        if len(o) != len(clean) or any(len(f) != n for f in o):
            raise ValueError("every twin set needs features of the same layers and images as the clean set")
    dropped = config.drop_first == "all"
    fn = jax.jit(lid_mle, static_argnums=(2, 3))
    outs = [np.zeros((n, len(clean), len(config.ks)), np.float32) for _ in range(1 + len(others))]
    if n < MIN_BATCH:
        raise ValueError(f"LID needs at least {MIN_BATCH} images, got {n}")
    bounds = list(range(0, n, config.batch_size)) + [n]
    if len(bounds) > 2 and n - bounds[-2] < MIN_BATCH:
        del bounds[-2]        # too small a last mini-batch for an estimate: it joins the previous one
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for li in range(len(clean)):
            ref = clean[li][lo:hi]
            for ki, k in enumerate(config.ks):
                outs[0][lo:hi, li, ki] = fn(ref, ref, k, True)
                for o, out in zip(others, outs[1:]):
                    out[lo:hi, li, ki] = fn(ref, o[li][lo:hi], k, dropped)
    return outs


__all__ = ["DROP_RULES", "LIDConfig", "LID_KS", "lid_features", "lid_mle"]
