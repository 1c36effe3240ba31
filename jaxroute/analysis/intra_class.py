"""Intra-class clustering of whole CDRPs (DGR paper Sec. 4.2, Fig. 6 and Fig. 7).

Within one class, agglomerative clustering of the routing paths groups images
that the network processes alike; rendering each cluster as an image grid
surfaces the typical layouts of a class and, in small clusters, its hard or
atypical examples.
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


def plot_clusters(images: np.ndarray, ids: np.ndarray, path, per_cluster: int = 12, title: str = "") -> None:
    """One row of up to ``per_cluster`` images per cluster (cluster size in the row label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(ids.max()) + 1
    fig, axes = plt.subplots(k, per_cluster, figsize=(per_cluster * 0.9, k * 1.0), squeeze=False)
    for r in range(k):
        members = np.flatnonzero(ids == r)
        for c in range(per_cluster):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(members):
                im = images[members[c]]
                ax.imshow(im.squeeze(), cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=1)
        axes[r, 0].set_ylabel(f"{r}: n={len(members)}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
