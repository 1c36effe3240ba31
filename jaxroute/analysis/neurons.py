"""What a neuron responds to: class histograms of its top images and their WordNet consistency.

Dong et al., "Towards Interpretable Deep Neural Networks by Leveraging
Adversarial Examples" (arXiv:1708.05493, Sec. 2.2), treat every channel of
every layer as a neuron and look at the images that excite it most:

* a channel's response to an image is one number, its activation map reduced
  over space.  The paper does not say how; the default here is the spatial
  maximum (as Zhou et al.'s network dissection, the paper's [33], ranks
  units), ``reduce="mean"`` takes the spatial mean;
* per neuron the top ``top_frac`` (paper: 1%) real images and the top 1%
  adversarial images by that response;
* p = the class histogram of the real top set, q / q̃ = the histograms of the
  adversarial top set's original / target classes;
* with the class correlation C = exp(-d²/2σ²) of WordNet distances d
  (:func:`jaxroute.analysis.wordnet.correlation_matrix`, σ = 1, Eq. 2):
  LC = pᵀCp (Eq. 3), CS1 = pᵀCq / √(pᵀCp · qᵀCq), CS2 likewise with q̃
  (Eqs. 4-5).  C is positive definite for the CIFAR-10 synsets (smallest
  eigenvalue 0.8647 at σ = 1), so every CS lies in [0, 1].

Everything here is a pure jnp function of arrays (jittable, static sizes); the
neurons of all layers are one flat axis in the model's gate order
(``model.spec``), so all scores come from one einsum.  :func:`binned_curve`
averages a score in LC bins (the paper's Fig. 4, which does not say how it
binned: equal-width bins here).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.utils.checks import check_int

REDUCTIONS = ("max", "mean")


def check_top_frac(top_frac) -> float:
    if isinstance(top_frac, bool) or not isinstance(top_frac, (int, float)) or not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must be a fraction in (0, 1], got {top_frac!r}")
    return float(top_frac)


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return reduce


def reduce_channels(act: jax.Array, reduce: str = "max") -> jax.Array:
    """(B, ..., C) activation -> (B, C): spatial max or mean per channel ((B, C) passes through)."""
    check_reduce(reduce)
    axes = tuple(range(1, act.ndim - 1))
    if not axes:
        return act
    return act.max(axis=axes) if reduce == "max" else act.mean(axis=axes)


def channel_statistics(model, x: jax.Array, gates=None, *, reduce: str = "max") -> jax.Array:
    """(B, D) response of every neuron (channel of every gate point, ``model.spec`` order) to ``x``.

    One :meth:`GatedModel.capture` pass; D = ``model.spec.size``.
    """
    return stack_responses(model.capture(x, gates).acts, model.spec.names, reduce)


def stack_responses(acts: dict, names, reduce: str = "max") -> jax.Array:
    """(B, D) responses from captured activations ``{point: (B, ..., C)}``, points in the order ``names``."""
    return jnp.concatenate([reduce_channels(acts[name], reduce) for name in names], axis=-1)


def top_count(n: int, top_frac: float) -> int:
    """How many of ``n`` images form a neuron's top set: round(top_frac · n), at least 1."""
    check_top_frac(top_frac)
    if n < 1:
        raise ValueError("need at least one image to select a top set from")
    return max(1, min(n, int(math.floor(top_frac * n + 0.5))))


def top_indices(stats: jax.Array, k: int) -> jax.Array:
    """(D, k) indices of the k images with the largest response, per neuron, from (N, D) responses."""
    return jax.lax.top_k(stats.T, k)[1]


def class_histograms(idx: jax.Array, classes: jax.Array, num_classes: int) -> jax.Array:
    """(D, K) normalized class histogram of each neuron's top set: ``classes[idx]`` counted per row."""
    return jax.nn.one_hot(classes[idx], num_classes, dtype=jnp.float32).mean(axis=1)


class NeuronScores(NamedTuple):
    lc: jax.Array    # (D,) label consistency pᵀCp
    cs1: jax.Array   # (D,) p against the adversarial top set's original classes
    cs2: jax.Array   # (D,) p against the adversarial top set's target classes
    p: jax.Array     # (D, K) real top-set class histogram
    q: jax.Array     # (D, K) adversarial top set, original classes
    qt: jax.Array    # (D, K) adversarial top set, target classes


def consistency_scores(p: jax.Array, q: jax.Array, qt: jax.Array, corr: jax.Array) -> tuple[jax.Array, ...]:
    """(LC, CS1, CS2) of every neuron from its histograms (D, K) and the class correlation (K, K).

    One einsum gives all the quadratic forms aᵀCb; an all-zero histogram
    (never the case for a top set) would give CS 0, not NaN.
    """
    h = jnp.stack([p, q, qt])                         # (3, D, K)
    g = jnp.einsum("adk,kl,bdl->abd", h, corr, h)     # (3, 3, D): every pair's aᵀCb per neuron
    lc = g[0, 0]
    norm = jnp.sqrt(jnp.maximum(jnp.diagonal(g, axis1=0, axis2=1), 0.0))  # (D, 3)

    def cs(j):
        den = norm[:, 0] * norm[:, j]
        return jnp.where(den > 0, g[0, j] / jnp.where(den > 0, den, 1.0), 0.0)

    return lc, cs(1), cs(2)


def neuron_scores(real_stats, real_labels, adv_stats, adv_labels, adv_targets, corr, *,
                  top_frac: float = 0.01) -> NeuronScores:
    """LC, CS1, CS2 of every neuron (Dong et al. Eqs. 3-5) from responses of real and adversarial images.

    ``real_stats`` (N, D) with ``real_labels`` (N,); ``adv_stats`` (M, D) with the
    adversarial images' original classes ``adv_labels`` and targets ``adv_targets``
    (M,); ``corr`` the (K, K) class correlation.  Top sets: ``top_frac`` of N and of M.
    """
    real_stats, adv_stats = jnp.asarray(real_stats), jnp.asarray(adv_stats)
    corr = jnp.asarray(corr, jnp.float32)
    if real_stats.ndim != 2 or adv_stats.ndim != 2 or real_stats.shape[1] != adv_stats.shape[1]:
        raise ValueError(f"need responses (N, D) and (M, D) over the same neurons, got {real_stats.shape} "
                         f"and {adv_stats.shape}")
    for name, a, n in (("real_labels", real_labels, len(real_stats)), ("adv_labels", adv_labels, len(adv_stats)),
                       ("adv_targets", adv_targets, len(adv_stats))):
        if np.shape(a) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {np.shape(a)}")
    k = corr.shape[0]
    if corr.shape != (k, k):
        raise ValueError(f"the class correlation must be square, got {corr.shape}")
    kr, ka = top_count(len(real_stats), top_frac), top_count(len(adv_stats), top_frac)
    return _scores(real_stats, jnp.asarray(real_labels), adv_stats, jnp.asarray(adv_labels),
                   jnp.asarray(adv_targets), corr, kr, ka)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _scores(real_stats, real_labels, adv_stats, adv_labels, adv_targets, corr, kr, ka):
    k = corr.shape[0]
    ir, ia = top_indices(real_stats, kr), top_indices(adv_stats, ka)
    p = class_histograms(ir, real_labels, k)
    q = class_histograms(ia, adv_labels, k)
    qt = class_histograms(ia, adv_targets, k)
    lc, cs1, cs2 = consistency_scores(p, q, qt, corr)
    return NeuronScores(lc, cs1, cs2, p, q, qt)


def binned_curve(x, y, bins: int = 10, lo: float | None = None, hi: float | None = None):
    """Mean of ``y`` in ``bins`` equal-width bins of ``x`` over [lo, hi] (default: x's range).

    Returns (edges (bins+1,), means (bins,), counts (bins,)); an empty bin's mean is NaN.
    """
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    check_int(bins, "bins")
    lo = x.min() if lo is None else lo
    hi = x.max() if hi is None else hi
    edges = jnp.linspace(lo, hi, bins + 1)
    b = jnp.clip(jnp.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    inside = (x >= lo) & (x <= hi)
    counts = jnp.zeros(bins).at[b].add(inside.astype(jnp.float32))
    sums = jnp.zeros(bins).at[b].add(jnp.where(inside, y, 0.0))
    return edges, jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.nan), counts.astype(jnp.int32)
