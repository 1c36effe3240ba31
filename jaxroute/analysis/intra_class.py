"""Intra-class clustering of whole CDRPs (DGR paper Sec. 4.2, Fig. 6 and Fig. 7).

Within one class, agglomerative clustering of the routing paths groups images
that the network processes alike; rendering each cluster as an image grid
surfaces the typical layouts of a class and, in small clusters, its hard or
atypical examples.  :func:`cluster_summary` puts a number on "hard": the
fraction of each cluster's images the model classifies correctly.

:func:`centroid_distance` orders a cluster's images by their CDRP's distance
to the cluster's mean CDRP (most typical first); ``plots.plot_clusters``
draws the grids.
"""
from __future__ import annotations

import numpy as np
from sklearn.cluster import AgglomerativeClustering


def cluster_class(cdrp: np.ndarray, n_clusters: int = 4, linkage: str = "ward") -> np.ndarray:
    """Cluster ids (0 = largest cluster) for the CDRPs of one class."""
    cdrp = np.asarray(cdrp)
    if len(cdrp) < n_clusters:
        raise ValueError(f"need at least {n_clusters} CDRPs to make {n_clusters} clusters, got {len(cdrp)}")
    ids = AgglomerativeClustering(n_clusters=n_clusters, linkage=linkage).fit_predict(cdrp)
    order = np.argsort(-np.bincount(ids, minlength=n_clusters), kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(n_clusters)
    return remap[ids]


def centroid_distance(cdrp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Euclidean distance of each CDRP to the mean CDRP of its cluster (small = typical)."""
    cdrp, ids = np.asarray(cdrp, np.float64), np.asarray(ids)
    if len(cdrp) != len(ids):
        raise ValueError(f"{len(cdrp)} CDRPs but {len(ids)} cluster ids")
    cent = np.stack([cdrp[ids == k].mean(0) for k in range(int(ids.max()) + 1)])
    return np.linalg.norm(cdrp - cent[ids], axis=1)


def cluster_summary(ids: np.ndarray, correct: np.ndarray | None = None) -> list[dict]:
    """Per cluster: size and, given ``correct`` (bool per image), the model's accuracy on it."""
    ids = np.asarray(ids)
    rows = []
    for k in range(int(ids.max()) + 1):
        sel = ids == k
        row = {"cluster": k, "size": int(sel.sum())}
        if correct is not None:
            row["accuracy"] = float(np.mean(np.asarray(correct)[sel])) if sel.any() else float("nan")
        rows.append(row)
    return rows
