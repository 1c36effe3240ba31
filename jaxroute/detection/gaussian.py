"""Class-conditional Gaussians over feature vectors: fit in float64, score with Cholesky solves.

Each class k gets N(μ_k, Σ_k) on (N, D) features.  Two covariance models:

- ``"tied"`` (default): one Σ shared by all classes, the covariance of the
  class-centred features x_i − μ_{y_i}.  This is Lee et al.'s Mahalanobis
  detector (NeurIPS 2018; ``sample_estimator`` in the reference code fits
  scikit-learn's ``EmpiricalCovariance`` on the class-centred features).
- ``"per_class"``: Σ_k from class k's samples alone (Dong et al. 2017, §2.4).

Shrinkage (``"ledoit_wolf"``, default, or ``"none"``).  With thousands of
feature dimensions and a few thousand samples per class the empirical
covariance is singular or badly conditioned; Ledoit–Wolf shrinks it towards
a scaled identity with the analytically optimal weight (scikit-learn's
``ledoit_wolf``).  ``"none"`` is the maximum-likelihood covariance (divided
by N, as ``EmpiricalCovariance``), Lee et al.'s choice; it needs more
samples than dimensions.  Neither paper regularises, so the default is our
choice: it changes nothing measurable when N ≫ D and keeps large-D features
usable.

Fitting runs in float64 numpy.  Scoring (:func:`mahalanobis`,
:func:`log_density`) is pure ``jnp``: jittable, vmappable, differentiable in
``x`` (Lee et al.'s input pre-processing takes its gradient), using the
lower Cholesky factor L of each Σ (Σ = L Lᵀ) and triangular solves — no
explicit inverse:  d_k(x) = ‖L_k⁻¹ (x − μ_k)‖².
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular

from jaxroute.utils.checks import check_int

COVARIANCES = ("tied", "per_class")
SHRINKAGES = ("ledoit_wolf", "none")


@dataclasses.dataclass(frozen=True, eq=False)
class ClassGaussians:
    """K class-conditional Gaussians over D-dimensional features (a pytree; passes through ``jit``).

    ``means``: (K, D).  ``chol``: lower Cholesky factors of the covariances,
    (1, D, D) when ``covariance == "tied"``, else (K, D, D).  ``logdet``:
    log det Σ per factor, (1,) or (K,).  ``covariance`` and ``shrinkage`` are
    static metadata.  Arrays are float64 numpy after fitting; inside ``jit``
    they follow JAX's dtype rules (float32 unless x64 is enabled).
    """

    means: np.ndarray
    chol: np.ndarray
    logdet: np.ndarray
    covariance: str = "tied"
    shrinkage: str = "ledoit_wolf"

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def covariances(self) -> np.ndarray:
        """Σ = L Lᵀ per factor, float64 numpy, (1, D, D) or (K, D, D)."""
        chol = np.asarray(self.chol, np.float64)
        return chol @ np.swapaxes(chol, -1, -2)

    @property
    def precisions(self) -> np.ndarray:
        """Σ⁻¹ per factor from the Cholesky factor (for inspection; scoring never forms it)."""
        chol = np.asarray(self.chol, np.float64)
        eye = np.eye(chol.shape[-1])
        return np.stack([_cho_solve_np(c, eye) for c in chol])


jax.tree_util.register_dataclass(
    ClassGaussians, data_fields=["means", "chol", "logdet"], meta_fields=["covariance", "shrinkage"])


def _cho_solve_np(chol: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve (L Lᵀ) x = b in float64 with scipy's triangular solves."""
    from scipy.linalg import solve_triangular as st

    return st(chol.T, st(chol, b, lower=True), lower=False)


def _covariance(x: np.ndarray, shrinkage: str) -> np.ndarray:
    """Covariance of rows ``x`` about their own mean (MLE, /N), optionally Ledoit–Wolf shrunk."""
    from sklearn.covariance import EmpiricalCovariance, ledoit_wolf

    if shrinkage == "ledoit_wolf":
        return ledoit_wolf(x, assume_centered=False)[0]
    return EmpiricalCovariance(assume_centered=False).fit(x).covariance_


def fit_class_gaussians(features, labels, num_classes: int, *, covariance: str = "tied",
                        shrinkage: str = "ledoit_wolf") -> ClassGaussians:
    """Fit one Gaussian per class to (N, D) ``features`` with integer ``labels`` in [0, num_classes).

    ``covariance="tied"``: Σ = covariance of the class-centred features (Lee
    et al.); every class needs at least one sample.  ``"per_class"``: Σ_k of
    class k's samples; every class needs at least two.  ``shrinkage``:
    ``"ledoit_wolf"`` (default) or ``"none"`` (see the module doc).  Raises
    ValueError for bad shapes, labels, option names, or a singular covariance
    (TypeError for non-integer labels).
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if shrinkage not in SHRINKAGES:
        raise ValueError(f"shrinkage must be one of {SHRINKAGES}, got {shrinkage!r}")
    check_int(num_classes, "num_classes")
    num_classes = int(num_classes)
    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must be ({x.shape[0]},) to match the features, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    counts = np.bincount(y, minlength=num_classes)
    need = 1 if covariance == "tied" else 2
    if (counts < need).any():
        bad = np.flatnonzero(counts < need).tolist()
        raise ValueError(f"covariance={covariance!r} needs at least {need} sample(s) per class; "
                         f"class(es) {bad} have {counts[bad].tolist()}")
    means = np.stack([x[y == k].mean(0) for k in range(num_classes)])
    if covariance == "tied":
        covs = _covariance(x - means[y], shrinkage)[None]
    else:
        covs = np.stack([_covariance(x[y == k], shrinkage) for k in range(num_classes)])
    chols = []
    for i, c in enumerate(covs):
        try:
            chol = np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            chol = None
        # A rank-deficient covariance may still factor with round-off pivots; a condition number
        # beyond 1e16 (diagonal ratio 1e-8) is singular in float64 either way.
        diag = None if chol is None else np.diagonal(chol)
        if diag is None or not diag.min() > 1e-8 * diag.max():
            which = "the tied covariance" if covariance == "tied" else f"class {i}'s covariance"
            n = int(counts.sum() if covariance == "tied" else counts[i])
            raise ValueError(f"{which} is singular (D={x.shape[1]}, {n} samples); use shrinkage='ledoit_wolf' "
                             "or more samples")
        chols.append(chol)
    chol = np.stack(chols)
    logdet = 2.0 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(-1)
    return ClassGaussians(means=means, chol=chol, logdet=logdet, covariance=covariance, shrinkage=shrinkage)


def _check_x(g: ClassGaussians, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != g.means.shape[1]:
        raise ValueError(f"x must be (N, {g.means.shape[1]}) to match the fitted features, got shape {x.shape}")
    return x


def mahalanobis(g: ClassGaussians, x) -> jax.Array:
    """Squared Mahalanobis distances d_k(x) = (x − μ_k)ᵀ Σ_k⁻¹ (x − μ_k), (N, D) → (N, K).

    Pure and jittable; triangular solves with the Cholesky factors.  For a
    tied covariance, x and the means are whitened once (N + K solves) and
    the distances are those of the whitened vectors.
    """
    x = _check_x(g, x)
    means, chol = jnp.asarray(g.means), jnp.asarray(g.chol)
    if g.covariance == "tied":
        zx = solve_triangular(chol[0], x.T, lower=True).T            # (N, D)
        zm = solve_triangular(chol[0], means.T, lower=True).T        # (K, D)
        # The difference itself (not ‖a‖² + ‖b‖² − 2ab) so a point at a mean scores 0 exactly.
        return jnp.sum((zx[:, None, :] - zm[None]) ** 2, axis=-1)

    def one(mu, c):
        return jnp.sum(solve_triangular(c, (x - mu).T, lower=True) ** 2, axis=0)   # (N,)

    return jax.vmap(one)(means, chol).T


def paired_mahalanobis(g: ClassGaussians, x) -> jax.Array:
    """d_k(x_k) = (x_k − μ_k)ᵀ Σ_k⁻¹ (x_k − μ_k): one feature vector per class, (N, K, D) → (N, K).

    Class k's distance is measured from its own row ``x[:, k]`` (a feature
    computed for class k, e.g. through class k's subnetwork).  With the same
    vector in every row this is :func:`mahalanobis`.  Pure and jittable.
    """
    x = jnp.asarray(x)
    k, dim = g.means.shape
    if x.ndim != 3 or x.shape[1:] != (k, dim):
        raise ValueError(f"x must be (N, {k}, {dim}) to match the fitted features, got shape {x.shape}")
    means, chol = jnp.asarray(g.means), jnp.asarray(g.chol)
    if g.covariance == "tied":
        n = x.shape[0]
        zx = solve_triangular(chol[0], x.reshape(n * k, dim).T, lower=True).T.reshape(n, k, dim)
        zm = solve_triangular(chol[0], means.T, lower=True).T        # (K, D)
        return jnp.sum((zx - zm[None]) ** 2, axis=-1)

    def one(mu, c, xk):
        return jnp.sum(solve_triangular(c, (xk - mu).T, lower=True) ** 2, axis=0)   # (N,)

    return jax.vmap(one, in_axes=(0, 0, 1), out_axes=1)(means, chol, x)


def log_density(g: ClassGaussians, x) -> jax.Array:
    """log N(x; μ_k, Σ_k) for every class, (N, D) → (N, K): −½ (d_k + log det Σ_k + D log 2π)."""
    d = mahalanobis(g, x)
    return -0.5 * (d + jnp.asarray(g.logdet)[None, :] + g.means.shape[1] * math.log(2 * math.pi))


__all__ = ["COVARIANCES", "SHRINKAGES", "ClassGaussians", "fit_class_gaussians", "log_density", "mahalanobis",
           "paired_mahalanobis"]
