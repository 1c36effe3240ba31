"""The Mantel test (jaxroute.analysis.similarity.mantel) against brute force and an exact permutation count."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import spearmanr

from jaxroute.analysis.similarity import mantel


def _dissimilarity(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 3))
    return np.linalg.norm(x[:, None] - x[None], axis=-1)


def _triangle(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(len(m), 1)]


def test_mantel_equals_a_brute_force_loop_over_the_same_permutations():
    rng = np.random.default_rng(1)
    a = _dissimilarity(rng, 7)
    b = a + 0.8 * _dissimilarity(rng, 7)
    b[0, 1] = b[1, 0] = b[2, 3] = b[3, 2]   # a tie: Spearman's average ranks
    rho, p = mantel(a, b, permutations=199, seed=3)
    assert rho == pytest.approx(spearmanr(_triangle(a), _triangle(b)).statistic, abs=1e-12)
    draws = np.random.default_rng(3)
    null = []
    for _ in range(199):
        q = draws.permutation(7)
        null.append(spearmanr(_triangle(a), _triangle(b[np.ix_(q, q)])).statistic)
    null = np.asarray(null)
    assert p == pytest.approx((np.sum(np.abs(null) >= abs(rho) - 1e-12) + 1) / 200, abs=1e-12)
    _, p_greater = mantel(a, b, permutations=199, seed=3, alternative="greater")
    assert p_greater == pytest.approx((np.sum(null >= rho - 1e-12) + 1) / 200, abs=1e-12)


def test_mantel_p_approaches_the_exact_permutation_p_value():
    rng = np.random.default_rng(0)
    a = _dissimilarity(rng, 5)
    b = a + 0.5 * _dissimilarity(rng, 5)
    rho = spearmanr(_triangle(a), _triangle(b)).statistic
    exact = np.mean([abs(spearmanr(_triangle(a), _triangle(b[np.ix_(q, q)])).statistic) >= abs(rho) - 1e-12
                     for q in map(list, itertools.permutations(range(5)))])
    r, p = mantel(a, b, permutations=9999, seed=0)
    assert r == pytest.approx(rho)
    assert p == pytest.approx(exact, abs=0.015)   # 9,999 draws: binomial sd < 0.005


def test_mantel_of_a_matrix_with_itself_and_with_a_monotone_transform():
    rng = np.random.default_rng(2)
    a = _dissimilarity(rng, 8)
    rho, p = mantel(a, a, permutations=999, seed=0)
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 1000)   # no relabelling of 8 items matches
    rho2, p2 = mantel(a, np.sqrt(a) * 3, permutations=999, seed=0)   # ranks are all that count
    assert (rho2, p2) == pytest.approx((rho, p))
    rho3, _ = mantel(a, -a + a.max() * (1 - np.eye(8)), permutations=10, seed=0)
    assert rho3 == pytest.approx(-1.0)
    assert np.isnan(mantel(a, 1 - np.eye(8), permutations=10)[0])   # a constant triangle


@pytest.mark.parametrize("kw, msg", [
    ({"a": np.ones((3, 4))}, "square"), ({"a": np.zeros((2, 2))}, "n >= 3"),
    ({"a": np.arange(9.0).reshape(3, 3)}, "symmetric"), ({"b": np.zeros((4, 4))}, "same items"),
    ({"permutations": 0}, "permutations"), ({"permutations": 1.5}, "permutations"), ({"seed": -1}, "seed"),
    ({"alternative": "both"}, "alternative"), ({"a": np.full((3, 3), np.nan)}, "non-finite")])
def test_mantel_rejects_bad_input(kw, msg):
    args = {"a": 1 - np.eye(3), "b": 1 - np.eye(3), "permutations": 9, "seed": 0, **kw}
    with pytest.raises(ValueError, match=msg):
        mantel(args.pop("a"), args.pop("b"), **args)
