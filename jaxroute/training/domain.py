"""Domain-alignment losses between clean and adversarial feature batches.

Each is a pure ``jnp`` function ``loss(clean_features, adv_features) -> scalar``
of two (n, k) feature batches (rows: samples), usable as the feature-consistency
term of adversarial training:

* :func:`coral`: CORAL.  ``norm="l1"`` (default) is Xie's Eq. 8,
  ``(1/k²) ‖C(D) − C(A)‖₁`` (entry-wise ℓ1); ``norm="fro2"`` is Deep CORAL
  (Sun & Saenko 2016), ``‖C_S − C_T‖²_F / (4k²)``.  Covariances are unbiased
  (divide by n − 1), as Deep CORAL defines them.
* :func:`linear_mmd`: Xie's Eq. 9, ``(1/k) ‖mean φ(D) − mean φ(A)‖₁``.
* :func:`gaussian_mmd2`: the unbiased estimate of MMD² with a sum of Gaussian
  kernels ``Σ_s exp(−‖x − y‖² / (2 σ_s²))``, ``σ_s = median · {1/4, 1/2, 1, 2, 4}``
  where ``median`` is the median pairwise Euclidean distance over both
  batches together (off-diagonal pairs; held constant under differentiation).

:func:`make_domain_loss` returns one of them by name with its options bound.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
DOMAIN_LOSSES = ("coral", "linear_mmd", "gaussian_mmd")


def _check_pair(a, b, name: str, min_rows: int = 1):
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{name} needs two feature batches (n, k) and (m, k), got {a.shape} and {b.shape}")
    if a.shape[0] < min_rows or b.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows per batch, got {a.shape[0]} and {b.shape[0]}")
    return a, b


def covariance(x: jax.Array) -> jax.Array:
    """Unbiased (k, k) covariance of the rows of (n, k) ``x`` (n >= 2)."""
    xc = x - x.mean(axis=0, keepdims=True)
    return xc.T @ xc / (x.shape[0] - 1)


def coral(clean: jax.Array, adv: jax.Array, norm: str = "l1") -> jax.Array:
    """CORAL distance of two feature batches: ``"l1"`` Eq. 8, ``"fro2"`` Deep CORAL (see module docstring)."""
    clean, adv = _check_pair(clean, adv, "coral", min_rows=2)
    k = clean.shape[1]
    d = covariance(clean) - covariance(adv)
    if norm == "l1":
        return jnp.abs(d).sum() / k ** 2
    if norm == "fro2":
        return jnp.square(d).sum() / (4 * k ** 2)
    raise ValueError(f"norm must be 'l1' or 'fro2', got {norm!r}")


def linear_mmd(clean: jax.Array, adv: jax.Array) -> jax.Array:
    """Eq. 9: ``(1/k) ‖mean(clean) − mean(adv)‖₁``."""
    clean, adv = _check_pair(clean, adv, "linear_mmd")
    return jnp.abs(clean.mean(0) - adv.mean(0)).sum() / clean.shape[1]


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return jnp.maximum(d, 0.0)


def gaussian_mmd2(clean: jax.Array, adv: jax.Array, factors: Sequence[float] = BANDWIDTH_FACTORS) -> jax.Array:
    """Unbiased MMD² with Gaussian kernels at median-heuristic bandwidths (see module docstring)."""
    clean, adv = _check_pair(clean, adv, "gaussian_mmd2", min_rows=2)
    n, m = clean.shape[0], adv.shape[0]
    z = jnp.concatenate([clean, adv])
    d2 = _sq_dists(z, z)
    off = ~jnp.eye(n + m, dtype=bool)
    # median of the off-diagonal distances, each pair once (upper triangle)
    iu = jnp.triu_indices(n + m, 1)
    med = jax.lax.stop_gradient(jnp.median(jnp.sqrt(d2[iu])))
    med = jnp.where(med > 0, med, 1.0)  # identical points: any bandwidth gives the same (zero) MMD
    kern = sum(jnp.exp(-d2 / (2.0 * (med * f) ** 2)) for f in factors)
    kern = jnp.where(off, kern, 0.0)
    kxx = kern[:n, :n].sum() / (n * (n - 1))
    kyy = kern[n:, n:].sum() / (m * (m - 1))
    kxy = kern[:n, n:].sum() / (n * m)
    return kxx + kyy - 2.0 * kxy


def make_domain_loss(kind: str, **options) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``loss(clean_features, adv_features) -> scalar`` by name: ``"coral"`` (``norm="l1"|"fro2"``),
    ``"linear_mmd"``, ``"gaussian_mmd"`` (``factors=...``)."""
    table = {"coral": coral, "linear_mmd": linear_mmd, "gaussian_mmd": gaussian_mmd2}
    if kind not in table:
        raise ValueError(f"unknown domain loss {kind!r}; known: {DOMAIN_LOSSES}")
    return functools.partial(table[kind], **options) if options else table[kind]
