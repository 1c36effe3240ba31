"""Class-conditional Gaussians against scipy / scikit-learn references (float64, 64-d)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from jaxroute.detection.gaussian import ClassGaussians, fit_class_gaussians, log_density, mahalanobis

K, D = 3, 64


@pytest.fixture(scope="module")
def data():
    """Three 64-d classes with different means and correlated covariances, 150 samples each."""
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for k in range(K):
        a = rng.normal(size=(D, D)) / np.sqrt(D) + np.eye(D) * (0.5 + 0.3 * k)
        xs.append(rng.normal(size=(150, D)) @ a.T + rng.normal(size=D) * 2)
        ys.append(np.full(150, k))
    perm = rng.permutation(K * 150)
    return np.concatenate(xs)[perm], np.concatenate(ys)[perm]


@pytest.fixture
def x64():
    """Enable float64 in JAX for one test and restore the previous setting afterwards."""
    with jax.enable_x64():
        yield


def _centred(x, y):
    means = np.stack([x[y == k].mean(0) for k in range(K)])
    return x - means[y]


@pytest.mark.parametrize("covariance", ["tied", "per_class"])
@pytest.mark.parametrize("shrinkage", ["none", "ledoit_wolf"])
def test_log_density_matches_scipy(data, x64, covariance, shrinkage):
    x, y = data
    g = fit_class_gaussians(x, y, K, covariance=covariance, shrinkage=shrinkage)
    q = x[:20] + 0.3
    got = np.asarray(jax.jit(log_density)(g, q))
    assert got.dtype == np.float64 and got.shape == (20, K)
    covs = g.covariances
    for k in range(K):
        ref = multivariate_normal(g.means[k], covs[0 if covariance == "tied" else k]).logpdf(q)
        np.testing.assert_allclose(got[:, k], ref, rtol=1e-6)
    assert np.allclose(g.means, np.stack([x[y == k].mean(0) for k in range(K)]))


def test_shrinkage_matches_ledoit_wolf(data):
    x, y = data
    tied = fit_class_gaussians(x, y, K)   # default: tied, Ledoit–Wolf
    assert (tied.covariance, tied.shrinkage) == ("tied", "ledoit_wolf")
    np.testing.assert_allclose(tied.covariances[0], LedoitWolf().fit(_centred(x, y)).covariance_,
                               rtol=1e-5, atol=1e-12)
    per = fit_class_gaussians(x, y, K, covariance="per_class")
    for k in range(K):
        np.testing.assert_allclose(per.covariances[k], LedoitWolf().fit(x[y == k]).covariance_,
                                   rtol=1e-5, atol=1e-12)


def test_precision_matches_empirical_covariance(data):
    """Lee et al.'s reference code: EmpiricalCovariance on the class-centred features."""
    x, y = data
    g = fit_class_gaussians(x, y, K, shrinkage="none")
    ref = EmpiricalCovariance(assume_centered=False).fit(_centred(x, y)).precision_
    np.testing.assert_allclose(g.precisions[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    per = fit_class_gaussians(x, y, K, covariance="per_class", shrinkage="none")
    for k in range(K):
        ref = EmpiricalCovariance().fit(x[y == k]).precision_
        np.testing.assert_allclose(per.precisions[k], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("covariance", ["tied", "per_class"])
def test_mahalanobis_float32_jit_and_grad(data, covariance):
    """Passes through jit as a pytree, float32 agrees with a float64 precision-matrix formula,
    a point at a class mean scores 0, and the gradient in x is the analytic 2 Σ⁻¹ (x − μ)."""
    x, y = data
    g = fit_class_gaussians(x, y, K, covariance=covariance)
    leaves, treedef = jax.tree_util.tree_flatten(g)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(treedef, leaves).covariance == covariance
    q = x[:8]
    got = np.asarray(jax.jit(mahalanobis)(g, jnp.asarray(q, jnp.float32)))
    p = g.precisions
    ref = np.stack([np.einsum("nd,de,ne->n", q - g.means[k], p[0 if covariance == "tied" else k], q - g.means[k])
                    for k in range(K)], 1)
    np.testing.assert_allclose(got, ref, rtol=2e-4)
    at_mean = np.asarray(mahalanobis(g, jnp.asarray(g.means, jnp.float32)))
    assert np.allclose(np.diag(at_mean), 0, atol=1e-4)
    grad = jax.jit(jax.vmap(jax.grad(lambda v: mahalanobis(g, v[None])[0, 1])))(jnp.asarray(q, jnp.float32))
    pk = p[0 if covariance == "tied" else 1]
    np.testing.assert_allclose(np.asarray(grad), 2 * (q - g.means[1]) @ pk, rtol=2e-3,
                               atol=2e-4 * np.abs(2 * (q - g.means[1]) @ pk).max())


def test_bad_input_errors(data):
    x, y = data
    with pytest.raises(ValueError, match="covariance must be one of"):
        fit_class_gaussians(x, y, K, covariance="diag")
    with pytest.raises(ValueError, match="shrinkage must be one of"):
        fit_class_gaussians(x, y, K, shrinkage="oas")
    with pytest.raises(ValueError, match="num_classes"):
        fit_class_gaussians(x, y, 0)
    with pytest.raises(ValueError, match=r"non-empty \(N, D\)"):
        fit_class_gaussians(x[:, 0], y, K)
    with pytest.raises(ValueError, match="labels must be"):
        fit_class_gaussians(x, y[:-1], K)
    with pytest.raises(TypeError, match="integers"):
        fit_class_gaussians(x, y.astype(float), K)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_class_gaussians(x, y, 2)
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have \[0\]"):
        fit_class_gaussians(x, y, K + 1)
    one = np.r_[np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:1]]
    fit_class_gaussians(x[one], y[one], K)   # tied: one sample of a class is enough
    with pytest.raises(ValueError, match="at least 2 sample"):
        fit_class_gaussians(x[one], y[one], K, covariance="per_class")
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_class_gaussians(bad, y, K)
    with pytest.raises(ValueError, match="singular"):
        fit_class_gaussians(x[:40], y[:40], K, shrinkage="none")   # 40 samples, 64 dimensions
    g = fit_class_gaussians(x[:40], y[:40], K)                     # Ledoit–Wolf copes
    assert isinstance(g, ClassGaussians) and np.isfinite(g.logdet).all()
    with pytest.raises(ValueError, match=r"x must be \(N, 64\)"):
        mahalanobis(g, x[:, :10])
