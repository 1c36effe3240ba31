"""Intra-class clustering of whole CDRPs (DGR paper Sec. 4.2, Fig. 6 and Fig. 7).

Within one class, agglomerative clustering of the routing paths groups images
that the network processes alike; rendering each cluster as an image grid
surfaces the typical layouts of a class and, in small clusters, its hard or
atypical examples.  :func:`cluster_summary` puts a number on "hard": the
fraction of each cluster's images the model classifies correctly.

Within a cluster, images are shown in order of their CDRP's distance to the
cluster's mean CDRP (most typical first); misclassified images can be framed.
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


def plot_clusters(images: np.ndarray, ids: np.ndarray, path, per_cluster: int = 12, title: str = "",
                  order: np.ndarray | None = None, mark: np.ndarray | None = None,
                  row_notes: list[str] | None = None, dpi: int = 90) -> None:
    """One row of up to ``per_cluster`` images per cluster (cluster size in the row label).

    ``order``: a score per image; each row shows its cluster's lowest-scoring images first
    (e.g. :func:`centroid_distance`).  ``mark``: bool per image, drawn with a red frame
    (e.g. misclassified).  ``row_notes``: extra text per cluster label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = np.asarray(ids)
    k = int(ids.max()) + 1
    fig, axes = plt.subplots(k, per_cluster, figsize=(per_cluster * 0.75 + 1.0, k * 0.8 + 0.4), squeeze=False)
    for r in range(k):
        members = np.flatnonzero(ids == r)
        if order is not None:
            members = members[np.argsort(np.asarray(order)[members], kind="stable")]
        for c in range(per_cluster):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(members):
                im = images[members[c]]
                ax.imshow(im.squeeze(), cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=1)
                if mark is not None and mark[members[c]]:
                    for s in ax.spines.values():
                        s.set_visible(True)
                        s.set_color("red")
                        s.set_linewidth(2)
        label = f"{r}: n={len(members)}" + (f"\n{row_notes[r]}" if row_notes else "")
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
