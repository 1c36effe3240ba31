"""Comparing two dissimilarity matrices over the same items: the Mantel test.

:func:`mantel` asks whether two (n, n) dissimilarity matrices of the same n
items (e.g. the distance between class subnetworks and the WordNet distance
between the classes) rank the n(n-1)/2 item pairs alike.  The statistic is
Spearman's ρ between the two upper triangles; its null distribution comes
from relabelling the items of one matrix (rows and columns permuted jointly),
which keeps each matrix's internal dependence between pairs that share an
item -- the reason an ordinary correlation test's p-value does not apply.

scikit-bio's ``skbio.stats.distance.mantel`` computes the same (its
``method="spearman"``, p-value ``(count + 1) / (permutations + 1)``), but it
is a heavy dependency for these few lines.
"""
from __future__ import annotations

import numpy as np

from jaxroute.utils.checks import check_int

ALTERNATIVES = ("two-sided", "greater", "less")


def _check_matrix(m, name: str) -> np.ndarray:
    m = np.asarray(m, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 3:
        raise ValueError(f"{name} must be a square (n, n) matrix with n >= 3, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} holds non-finite values")
    if not np.allclose(m, m.T, rtol=1e-9, atol=1e-12):
        raise ValueError(f"{name} must be symmetric")
    return m


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's ρ needs."""
    from scipy.stats import rankdata

    return rankdata(v, method="average")


def _pearson_rows(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pearson r between the vector ``x`` (m,) and every row of ``ys`` (P, m); NaN where one is constant."""
    xc = x - x.mean()
    yc = ys - ys.mean(-1, keepdims=True)
    den = np.sqrt((xc @ xc) * np.einsum("pm,pm->p", yc, yc))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (yc @ xc) / den


def mantel(a, b, *, permutations: int = 9999, seed: int = 0, alternative: str = "two-sided") -> tuple[float, float]:
    """Mantel test of two symmetric (n, n) dissimilarity matrices: (Spearman ρ, permutation p-value).

    ρ is Spearman's rank correlation between the n(n-1)/2 entries above the
    diagonals (the diagonals are ignored).  The p-value permutes the item labels
    of ``b`` -- its rows and columns jointly -- ``permutations`` times with
    ``numpy.random.default_rng(seed)`` and counts the permuted ρ at least as
    extreme as the observed one: ``(count + 1) / (permutations + 1)``.
    ``alternative``: ``"two-sided"`` (|ρ_perm| >= |ρ|), ``"greater"``
    (ρ_perm >= ρ) or ``"less"`` (ρ_perm <= ρ).  A relabelling only reorders the
    entries of ``b``, so ``b``'s ranks are computed once.  ρ and p are NaN when
    either triangle is constant.
    """
    a, b = _check_matrix(a, "a"), _check_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must describe the same items, got shapes {a.shape} and {b.shape}")
    check_int(permutations, "permutations")
    check_int(seed, "seed", 0)
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    n = a.shape[0]
    iu, ju = np.triu_indices(n, 1)
    ra = _ranks(a[iu, ju])
    rb = np.zeros_like(b)
    rb[iu, ju] = _ranks(b[iu, ju])
    rb = rb + rb.T
    rho = float(_pearson_rows(ra, rb[iu, ju][None])[0])
    if not np.isfinite(rho):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(n) for _ in range(permutations)])   # (P, n), one draw per permutation
    null = _pearson_rows(ra, rb[perms[:, iu], perms[:, ju]])
    # a tolerance so that a permuted ρ equal to the observed one up to rounding counts as "as extreme"
    tol = 1e-12
    if alternative == "two-sided":
        count = np.sum(np.abs(null) >= abs(rho) - tol)
    elif alternative == "greater":
        count = np.sum(null >= rho - tol)
    else:
        count = np.sum(null <= rho + tol)
    return rho, float((count + 1) / (permutations + 1))
