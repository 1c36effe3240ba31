"""Semantic distance between classes from the WordNet noun hierarchy.

The DGR paper (Sec. 4.3, Fig. 8) attacks towards a semantically close and a
semantically distant class to see whether the adversarial routing path
follows meaning.  "Close" needs a number: the path length between the
classes' noun synsets, the fewest is-a edges from one synset up to a common
hypernym and down to the other (NLTK's ``shortest_path_distance`` for
nouns).  :func:`correlation_matrix` turns those lengths into a class
correlation with a Gaussian kernel, for methods that want a similarity
rather than a distance.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

WORDNET_FILES = ("cifar10_wnids.tsv", "wordnet.is_a.txt", "words.txt")


def wordnet_distances(wordnet_dir, class_names) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """(K, K) WordNet path lengths between the classes' noun synsets, the wnids, and the
    lowest common hypernym ("wnid (first word)") of each pair.

    Path length = min over common hypernyms c of d(a, c) + d(b, c), with d the number
    of is-a edges (the DAG's shortest hypernym paths); ties between hypernyms go to
    the lowest wnid, so the result does not depend on set order.  Reads
    ``cifar10_wnids.tsv`` (class -> wnid), ``wordnet.is_a.txt`` (parent child) and
    ``words.txt`` (wnid -> words) from ``wordnet_dir``.
    """
    root = Path(wordnet_dir)
    for f in WORDNET_FILES:
        if not (root / f).is_file():
            raise FileNotFoundError(f"WordNet file {root / f} is missing")
    rows = [line.rstrip("\n").split("\t") for line in (root / "cifar10_wnids.tsv").read_text().splitlines()[1:]]
    wnid_of = {r[1]: r[2] for r in rows if len(r) >= 3}
    missing = [c for c in class_names if c not in wnid_of]
    if missing:
        raise ValueError(f"classes {missing} have no synset in {root / 'cifar10_wnids.tsv'}")
    parents = collections.defaultdict(set)
    for line in (root / "wordnet.is_a.txt").read_text().splitlines():
        p, c = line.split()
        parents[c].add(p)
    words = dict(line.split("\t", 1) for line in (root / "words.txt").read_text().splitlines() if "\t" in line)

    def ancestors(w):  # BFS upward: shortest hypernym distance to every ancestor (and itself)
        d, q = {w: 0}, collections.deque([w])
        while q:
            u = q.popleft()
            for v in parents[u]:
                if v not in d:
                    d[v] = d[u] + 1
                    q.append(v)
        return d

    wnids = [wnid_of[c] for c in class_names]
    anc = [ancestors(w) for w in wnids]
    k = len(wnids)
    dist = np.zeros((k, k), int)
    lch = [[""] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            common = set(anc[i]) & set(anc[j])
            if not common:
                raise ValueError(f"synsets {wnids[i]} and {wnids[j]} share no hypernym")
            c = min(sorted(common), key=lambda c: anc[i][c] + anc[j][c])
            dist[i, j] = anc[i][c] + anc[j][c]
            lch[i][j] = f"{c} ({words.get(c, '?').split(',')[0]})"
    return dist, wnids, lch


def correlation_matrix(d, sigma: float) -> np.ndarray:
    """Gaussian-kernel class correlation exp(-d² / (2σ²)) of a distance matrix.

    1 on the diagonal, falling with distance; ``sigma`` (in the distance's unit, e.g.
    WordNet edges) sets how fast, so it must be positive.
    """
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a positive number, got {sigma}")
    d = np.asarray(d, np.float64)
    return np.exp(-(d ** 2) / (2.0 * sigma ** 2))


def choose_pairs(dist: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """(closest, farthest) class pair (i < j) of a symmetric distance matrix.

    Ties go to the lowest (i, j), so the choice is reproducible and the attack runs from
    the lower-index class.
    """
    dist = np.asarray(dist)
    k = len(dist)
    if k < 2 or dist.shape != (k, k):
        raise ValueError(f"need a square distance matrix of at least 2 classes, got shape {dist.shape}")
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    close = min(pairs, key=lambda p: (dist[p], p))
    far = min(pairs, key=lambda p: (-dist[p], p))
    return close, far
