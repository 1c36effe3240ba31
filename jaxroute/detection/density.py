"""Kernel density and predictive uncertainty (Feinman et al., arXiv:1703.00410), "KD+PU".

KD: a Gaussian kernel density on the last hidden layer (the penultimate
features), fitted per class on that class's training images and evaluated
at the *predicted* class of the query:

    KD(x) = log (1/N_ĉ) Σ_{i: y_i = ĉ} N(f(x); f(x_i), h² I),   ĉ = argmax f(x),

the log density scikit-learn's ``KernelDensity(kernel="gaussian",
bandwidth=h).score_samples`` returns, as in the authors' code; h = 0.26 for
CIFAR-10 (the authors' cross-validated value).

PU: the variance over T stochastic forward passes of the softmax output,
averaged over classes (the authors' ``get_mc_predictions(...).var(0).mean(1)``;
the paper's Eq. sums instead of averaging, a constant factor that the
z-scoring removes).  The authors use MC dropout (T = 50).  Networks without
dropout (the shared CIFAR ResNets) get its stand-in here: every channel at
the gate points of the last stage is kept with probability 0.5 and scaled by
2 when kept (inverted dropout: the expected activation is unchanged), an
independent draw per image and pass.

Both values are z-scored over the data they are computed on (the authors'
``normalize``) and fed to a logistic regression
(:mod:`jaxroute.detection.protocol`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from jaxroute.detection.features import last_stage_points
from jaxroute.utils.checks import check_int
from jaxroute.utils.devices import map_batches

CIFAR10_BANDWIDTH = 0.26


@dataclasses.dataclass(frozen=True)
class KDPUConfig:
    """Bandwidth h, number of stochastic passes T and the keep probability of the random gates."""

    bandwidth: float = CIFAR10_BANDWIDTH
    passes: int = 50
    keep: float = 0.5

    def __post_init__(self):
        for name in ("bandwidth", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"KD+PU {name} must be a finite number, got {v!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"KD+PU bandwidth must be > 0, got {self.bandwidth}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"KD+PU keep must be in (0, 1], got {self.keep}")
        object.__setattr__(self, "passes", check_int(self.passes, "KD+PU passes", 2))   # a Python int


class KernelDensity:
    """Per-class Gaussian kernel densities of training features (fit / score shape).

    ``fit(features, labels)``: (N, D) training features and their classes;
    ``score(features, classes)``: the log density of each row under the
    kernel density of its given class (the predicted class, in KD).
    Computed in float64 in chunks of queries.
    """

    def __init__(self, bandwidth: float = CIFAR10_BANDWIDTH, chunk: int = 256):
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0 \
                or not math.isfinite(bandwidth):
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
        self.bandwidth, self.chunk = float(bandwidth), int(chunk)
        self.train: dict[int, np.ndarray] | None = None

    def fit(self, features, labels) -> "KernelDensity":
        x = np.asarray(features, np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or y.shape != (len(x),):
            raise ValueError(f"need (N, D) features and (N,) labels, got {x.shape} and {y.shape}")
        self.dim = x.shape[1]
        self.train = {int(c): x[y == c] for c in np.unique(y)}
        return self

    def score(self, features, classes) -> np.ndarray:
        if self.train is None:
            raise RuntimeError("fit the kernel density before scoring")
        q = np.asarray(features, np.float64)
        c = np.asarray(classes)
        if q.ndim != 2 or q.shape[1] != self.dim or c.shape != (len(q),):
            raise ValueError(f"need (N, {self.dim}) features and (N,) classes, got {q.shape} and {c.shape}")
        missing = sorted(set(np.unique(c).tolist()) - set(self.train))
        if missing:
            raise ValueError(f"no training samples of class(es) {missing}")
        h2 = self.bandwidth ** 2
        out = np.empty(len(q))
        for k, ref in self.train.items():
            rows = np.flatnonzero(c == k)
            norm = math.log(len(ref)) + 0.5 * self.dim * math.log(2 * math.pi * h2)
            ref_sq = (ref ** 2).sum(1)
            for lo in range(0, len(rows), self.chunk):
                r = rows[lo:lo + self.chunk]
                # float64 ‖a‖² + ‖b‖² − 2ab: no (chunk, N, D) tensor, rounding far below the 1e-5 we check
                d2 = np.maximum((q[r] ** 2).sum(1)[:, None] + ref_sq[None] - 2 * q[r] @ ref.T, 0.0)
                out[r] = logsumexp(-d2 / (2 * h2), axis=1) - norm
        return out


def random_gate_fn(model, key: jax.Array, keep: float, points: Sequence[str]):
    """A gate function dropping channels at ``points``: Bernoulli(keep) / keep per image and channel."""
    index = {p: i for i, p in enumerate(points)}

    def gates(name, a):
        if name not in index:
            return jnp.ones(a.shape[-1], a.dtype)
        k = jax.random.fold_in(key, index[name])
        return jax.random.bernoulli(k, keep, (a.shape[0], a.shape[-1])).astype(a.dtype) / keep

    return gates


def mc_probabilities(model, x: jax.Array, key: jax.Array, *, passes: int = 50, keep: float = 0.5,
                     points: Sequence[str] | None = None) -> jax.Array:
    """(T, B, K) softmax outputs of T passes with random gates at ``points`` (default: the last stage)."""
    points = last_stage_points(model) if points is None else model.spec.check_points(points)
    keys = jax.random.split(key, passes)
    return jax.vmap(lambda k: jax.nn.softmax(model.logits(x, random_gate_fn(model, k, keep, points)), -1))(keys)


def predictive_uncertainty(probs: jax.Array) -> jax.Array:
    """(T, B, K) stochastic softmax outputs -> (B,) variance over passes averaged over classes."""
    return jnp.var(probs, axis=0).mean(axis=-1)


def uncertainty(model, images, key: jax.Array, config: KDPUConfig = KDPUConfig(), batch_size: int = 100,
                points: Sequence[str] | None = None) -> np.ndarray:
    """Predictive uncertainty (N,) of images, batch by batch (batch i's passes use ``fold_in(key, i)``)."""
    fn = jax.jit(lambda i, x: predictive_uncertainty(mc_probabilities(
        model, x, jax.random.fold_in(key, i), passes=config.passes, keep=config.keep, points=points)))
    return map_batches(fn, (np.asarray(images, np.float32),), min(batch_size, len(images)))


def zscore(*arrays) -> list[np.ndarray]:
    """Z-score arrays jointly (one mean and std over all of them), as the authors' ``normalize``."""
    allv = np.concatenate([np.asarray(a, np.float64) for a in arrays])
    mu, sd = allv.mean(0), allv.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(np.asarray(a, np.float64) - mu) / sd for a in arrays]


__all__ = ["CIFAR10_BANDWIDTH", "KDPUConfig", "KernelDensity", "mc_probabilities", "predictive_uncertainty",
           "random_gate_fn", "uncertainty", "zscore"]
