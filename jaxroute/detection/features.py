"""Pooled per-layer features through the gated model, for the feature-space detectors.

Lee et al. (NeurIPS 2018) and Ma et al. (ICLR 2018, in Lee et al.'s
reference code) read one vector per layer: the spatial mean of the stem
output and of every stage output.  For a CIFAR ResNet with the default
``post_act`` gate placement those are the gate points ``conv1`` and the
last block of each stage (``layer1.{n-1}``, ``layer2.{n-1}``,
``layer3.{n-1}``): :func:`stage_points`.  Any other list of gate points
works too (a model without residual stages uses all its gate points).

The features are read through :meth:`GatedModel.capture`, so they can be
computed through gated networks: ``class_gates`` runs the forward pass once
per class c with class c's gates (a class-specific subnetwork) and returns
(B, K, C) features — f_c(x) of Wang et al. (arXiv:1910.02673) Eq. 4 — and
``feature_fn(..., by_label=True)`` reads each image through its own label's
gates (the class statistics of their Eq. 5).

:func:`feature_fn` is a per-sample function for
:func:`jaxroute.extraction.run_extraction`, so the features of 50,000
training images are computed once, in resumable shards.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)$")


def stage_points(model) -> tuple[str, ...]:
    """The stem and the last block of every stage (Lee et al.'s layers); all gate points when the
    model has no ``layerS.B`` block points (e.g. a plain CNN or the ``conv`` placement)."""
    names = tuple(model.spec.names)
    last: dict[int, str] = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            last[int(m.group(1))] = n   # forward order: the last match per stage is its last block
    if not last:
        return names
    return (names[0],) + tuple(last[s] for s in sorted(last))


def last_stage_points(model) -> tuple[str, ...]:
    """Every gate point of the last residual stage (``layerS.*`` with the largest S), or the last
    gate point when the model has no stages: where the stochastic passes of :mod:`density` drop channels."""
    names = tuple(model.spec.names)
    stages = [int(m.group(1)) for n in names if (m := re.match(r"^layer(\d+)\.", n))]
    if not stages:
        return names[-1:]
    prefix = f"layer{max(stages)}."
    return tuple(n for n in names if n.startswith(prefix))


def pool(a: jax.Array) -> jax.Array:
    """Spatial mean of an activation (B, ..., C) -> (B, C) (identity for (B, C))."""
    return a.mean(axis=tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a


def pooled_features(model, x: jax.Array, points: Sequence[str], gates=None) -> tuple[list[jax.Array], jax.Array]:
    """([(B, C_l) pooled activation per point], logits (B, K)) of one forward pass.  Pure, jittable."""
    cap = model.capture(x, gates)
    return [pool(cap.acts[p]) for p in points], cap.logits


def class_gated_features(model, x: jax.Array, points: Sequence[str], class_gates,
                         num_classes: int | None = None) -> list[jax.Array]:
    """[(B, K, C_l)]: the pooled features of x through each class's gates (vmapped over classes).

    ``class_gates`` is either gates with a leading class axis (a flat (K, D)
    array or a tree ``{point: (K, C)}``), or a function
    ``(c, point_name, activation) -> gate`` with ``c`` a traced class index.
    """
    if callable(class_gates):
        k = model.num_classes if num_classes is None else num_classes

        def gates_of(c):
            return lambda name, a: class_gates(c, name, a)
    else:
        leaves = jax.tree_util.tree_leaves(class_gates)
        k = int(leaves[0].shape[0])
        if any(int(leaf.shape[0]) != k for leaf in leaves):
            raise ValueError("class gates must share one leading class axis")

        def gates_of(c):
            return jax.tree_util.tree_map(lambda a: a[c], class_gates)
    per = jax.vmap(lambda c: pooled_features(model, x, points, gates_of(c))[0])(jnp.arange(k))   # [(K, B, C)]
    return [jnp.swapaxes(f, 0, 1) for f in per]


def feature_key(point: str) -> str:
    """The name of a point's pooled feature in an extraction output."""
    return f"pool_{point}"


def feature_fn(model, points: Sequence[str], *, class_gates=None, by_label: bool = False):
    """A per-sample function for :func:`jaxroute.extraction.run_extraction`.

    Returns ``{pool_<point>: (B, C) or (B, K, C), "penultimate": (B, F), "logits": (B, K)}``:
    the pooled features (class-gated when ``class_gates`` is given), the
    ungated penultimate features (the input of the last linear layer; the
    kernel-density detector's layer) and the ungated logits.

    ``by_label=True`` (with ``class_gates`` an array or tree with a leading
    class axis) returns only ``{pool_<point>: (B, C)}``: each image's pooled
    features through its own label's gates in one pass (per-sample gates) --
    the class statistics of Wang et al.'s Eq. 5, where μ̂_c is the mean of
    f_c over class c's training images.
    """
    points = model.spec.check_points(points)
    if by_label:
        if class_gates is None or callable(class_gates):
            raise ValueError("by_label needs class gates with a leading class axis (a (K, D) array or a tree)")
        k = int(jax.tree_util.tree_leaves(class_gates)[0].shape[0])

        @jax.jit
        def own(images, labels, index):
            # the extraction job passes -1 for a data set without labels; keep the index in range
            c = jnp.clip(labels, 0, k - 1)
            gates = jax.tree_util.tree_map(lambda a: jnp.asarray(a, images.dtype)[c], class_gates)
            feats, _ = pooled_features(model, images, points, gates)
            return {feature_key(p): f for p, f in zip(points, feats)}

        return own

    @jax.jit
    def fn(images, labels, index):
        cap = model.capture(images)
        out = {"penultimate": cap.features, "logits": cap.logits}
        if class_gates is None:
            feats = [pool(cap.acts[p]) for p in points]
        else:
            feats = class_gated_features(model, images, points, class_gates)
        out.update({feature_key(p): f for p, f in zip(points, feats)})
        return out

    return fn


def load_features(data: dict, points: Sequence[str]) -> list:
    """The pooled features of ``points`` from a loaded extraction output, with a clear error when absent."""
    missing = [p for p in points if feature_key(p) not in data]
    if missing:
        have = sorted(k[len("pool_"):] for k in data if k.startswith("pool_"))
        raise ValueError(f"the features hold no gate point(s) {missing} (they have {have}); "
                         "were they extracted with another model or layer list?")
    return [data[feature_key(p)] for p in points]


__all__ = ["class_gated_features", "feature_fn", "feature_key", "last_stage_points", "load_features", "pool",
           "pooled_features", "stage_points"]
