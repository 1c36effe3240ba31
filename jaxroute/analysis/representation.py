"""Where adversarial images sit among real ones in feature space: Dong et al.'s r1 and r2.

For an adversarial image x* made from a real image of class y towards y*
(arXiv:1708.05493, Eqs. 6-7), with φ the features of one layer (the paper: the
last conv layer) and S_c the real images of class c:

    r1(x*) = mean_{x ∈ S_y}  ‖φ(x*) − φ(x)‖  /  mean_{x ≠ x' ∈ S_y}       ‖φ(x) − φ(x')‖
    r2(x*) = mean_{x ∈ S_y*} ‖φ(x*) − φ(x)‖  /  mean_{x ∈ S_y, x' ∈ S_y*} ‖φ(x) − φ(x')‖

r1 > 1: x* has left its class's cloud; r2 < 1: it is nearer the target class
than a typical image of y is.  A real image used as x* leaves its own set (it
is not its own neighbour), so the control — every real image as x*, every
other class as y* — has mean r1 = mean r2 = 1 exactly: within class y the
mean over x* of the numerator is the denominator.

Distances are computed in float64 numpy in row chunks from
‖a‖² + ‖b‖² − 2a·b, so no (N, M, D) tensor is formed; ``chunk`` only changes
memory, not the result beyond rounding.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxroute.utils.checks import check_int


def _check(feats, labels, num_classes):
    feats = np.asarray(feats, np.float64)
    feats = feats.reshape(len(feats), -1)
    labels = np.asarray(labels)
    if labels.shape != (len(feats),):
        raise ValueError(f"need one label per feature row: {len(feats)} rows, labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return feats, labels.astype(np.int64)


def _check_chunk(chunk):
    check_int(chunk, "chunk")


def _distances(a, b, b_sq):
    d2 = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def class_distance_sums(queries, feats, labels, num_classes: int, *, exclude=None,
                        chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the sum of distances to each class's real set and that set's size: (Q, K) each.

    ``exclude`` (Q,) int: the row of ``feats`` that is the query itself (−1: none);
    it is left out of its own set.
    """
    _check_chunk(chunk)
    feats, labels = _check(feats, labels, num_classes)
    queries = np.asarray(queries, np.float64).reshape(len(queries), -1)
    if queries.shape[1] != feats.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features, the real set {feats.shape[1]}")
    onehot = np.eye(num_classes)[labels]                                   # (M, K)
    b_sq = (feats * feats).sum(1)
    ex = np.full(len(queries), -1) if exclude is None else np.asarray(exclude, np.int64)
    if ex.shape != (len(queries),):
        raise ValueError(f"exclude must have one entry per query ({len(queries)}), got shape {ex.shape}")
    sums = np.empty((len(queries), num_classes))
    for s in range(0, len(queries), chunk):
        d = _distances(queries[s:s + chunk], feats, b_sq)
        rows = np.nonzero(ex[s:s + chunk] >= 0)[0]
        d[rows, ex[s:s + chunk][rows]] = 0.0
        sums[s:s + chunk] = d @ onehot
    counts = np.broadcast_to(onehot.sum(0), sums.shape).copy()
    rows = np.nonzero(ex >= 0)[0]
    counts[rows, labels[ex[rows]]] -= 1
    return sums, counts


def class_pair_means(feats, labels, num_classes: int, *, chunk: int = 1024) -> np.ndarray:
    """(K, K) mean distance between real images of classes a and b (pairs i ≠ j within a class)."""
    feats, labels = _check(feats, labels, num_classes)
    sums, _ = class_distance_sums(feats, feats, labels, num_classes, exclude=np.arange(len(feats)), chunk=chunk)
    onehot = np.eye(num_classes)[labels]
    total = onehot.T @ sums                                                # (K, K) sum over pairs
    n = onehot.sum(0)
    pairs = np.outer(n, n) - np.diag(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, total / np.where(pairs > 0, pairs, 1), np.nan)


class Ratios(NamedTuple):
    r1: np.ndarray   # (Q,)
    r2: np.ndarray   # (Q,)


def distance_ratios(queries, query_labels, query_targets, feats, labels, num_classes: int, *, exclude=None,
                    pair_means=None, chunk: int = 1024) -> Ratios:
    """r1 and r2 (Eqs. 6-7) of every query x* with original class ``query_labels`` and target
    ``query_targets`` against the real set (``feats``, ``labels``).  ``pair_means`` (from
    :func:`class_pair_means`) may be passed to reuse it across calls."""
    feats, labels = _check(feats, labels, num_classes)
    y = np.asarray(query_labels, np.int64)
    t = np.asarray(query_targets, np.int64)
    if y.shape != (len(queries),) or t.shape != (len(queries),):
        raise ValueError(f"need one label and one target per query ({len(queries)}), got shapes {y.shape} "
                         f"and {t.shape}")
    for name, a in (("query_labels", y), ("query_targets", t)):
        if len(a) and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes})")
    pm = class_pair_means(feats, labels, num_classes, chunk=chunk) if pair_means is None else pair_means
    sums, counts = class_distance_sums(queries, feats, labels, num_classes, exclude=exclude, chunk=chunk)
    q = np.arange(len(y))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
        return Ratios(mean[q, y] / pm[y, y], mean[q, t] / pm[y, t])


def control_ratios(feats, labels, num_classes: int, *, chunk: int = 1024) -> Ratios:
    """r1 and r2 with every real image as x* (left out of its own set) and every other class as y*.

    r1 has one entry per image, r2 one per (image, other class), image-major.
    Their means are 1 up to rounding (the normalisation identity).
    """
    feats, labels = _check(feats, labels, num_classes)
    pm = class_pair_means(feats, labels, num_classes, chunk=chunk)
    sums, counts = class_distance_sums(feats, feats, labels, num_classes, exclude=np.arange(len(feats)), chunk=chunk)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
        n = np.arange(len(labels))
        r1 = mean[n, labels] / pm[labels, labels]
        r2 = mean / pm[labels]                                            # (N, K)
    other = np.ones_like(r2, bool)
    other[n, labels] = False
    present = np.bincount(labels, minlength=num_classes) > 0
    other &= present[None, :]
    return Ratios(r1, r2[other])
