"""Per-layer semantics of routing paths (DGR paper Sec. 4.2, Fig. 4 and Fig. 5).

Splits a CDRP matrix (N, D) into its gate layers and asks, layer by layer,
how well the gates alone separate the classes: K-means and agglomerative
clustering with K = number of classes, scored by homogeneity, completeness
and V-measure against the labels (the paper's finding: the scores rise with
depth), and a 2-D embedding (t-SNE; UMAP too when ``umap-learn`` is
installed) coloured by class.  Pure numpy / scikit-learn.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import homogeneity_completeness_v_measure
from sklearn.manifold import TSNE

from jaxroute.models.gates import GateSpec


def split_layers(cdrp: np.ndarray, spec: GateSpec) -> dict[str, np.ndarray]:
    cdrp = np.asarray(cdrp)
    if cdrp.ndim != 2 or cdrp.shape[1] != spec.size:
        raise ValueError(f"CDRP matrix must be (N, {spec.size}) for this gate layout, got {cdrp.shape}")
    return {n: cdrp[:, o : o + c] for n, c, o in zip(spec.names, spec.channels, spec.offsets)}


def layer_clustering_scores(cdrp: np.ndarray, labels: np.ndarray, spec: GateSpec, *, seed: int = 0,
                            n_clusters: int | None = None, other_labels: dict | None = None) -> list[dict]:
    """Homogeneity / completeness / V-measure of K-means and agglomerative (Ward) clusters, per layer.

    K defaults to the number of distinct labels.  ``other_labels`` ({name: labels}) scores the
    same clusters against further labelings too (e.g. the model's predictions), as
    ``{method}_v_measure_{name}``.
    """
    labels = np.asarray(labels)
    if len(labels) != len(cdrp):
        raise ValueError(f"{len(cdrp)} CDRPs but {len(labels)} labels")
    k = n_clusters or len(np.unique(labels))
    if not 1 <= k <= len(labels):
        raise ValueError(f"cannot make {k} clusters of {len(labels)} CDRPs")
    rows = []
    for name, g in split_layers(cdrp, spec).items():
        row = {"layer": name, "channels": g.shape[1]}
        km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(g)
        ag = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(g)
        for tag, pred in (("kmeans", km), ("agglomerative", ag)):
            h, c, v = homogeneity_completeness_v_measure(labels, pred)
            row.update({f"{tag}_homogeneity": h, f"{tag}_completeness": c, f"{tag}_v_measure": v})
            for lname, other in (other_labels or {}).items():
                row[f"{tag}_v_measure_{lname}"] = homogeneity_completeness_v_measure(np.asarray(other), pred)[2]
        rows.append(row)
    return rows


def embed_layers(cdrp: np.ndarray, spec: GateSpec, layers: Sequence[str] | None = None, *,
                 method: str = "tsne", seed: int = 0) -> dict[str, np.ndarray]:
    """2-D embedding of each chosen layer's gates (t-SNE, or UMAP if installed)."""
    parts = split_layers(cdrp, spec)
    layers = list(layers) if layers is not None else list(parts)
    out = {}
    for name in layers:
        g = parts[name]
        if method == "umap":
            try:
                import umap
            except ImportError as e:
                raise ImportError("UMAP embeddings need the optional package umap-learn") from e
            out[name] = umap.UMAP(random_state=seed).fit_transform(g)
        elif method == "tsne":
            out[name] = TSNE(n_components=2, init="pca", random_state=seed,
                             perplexity=min(30.0, max(5.0, (len(g) - 1) / 3))).fit_transform(g)
        else:
            raise ValueError(f"method must be 'tsne' or 'umap', got {method!r}")
    return out


def plot_embeddings(emb: dict[str, np.ndarray], labels, class_names, path, title: str = "", *,
                    cols: int = 4, panel: float = 3.2, dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(emb)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel * cols, panel * rows + 0.6), squeeze=False)
    labels = np.asarray(labels)
    cmap = plt.get_cmap("tab10")
    for ax, (name, xy) in zip(axes.flat, emb.items()):
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, color=cmap(int(c) % 10), label=class_names[int(c)],
                       linewidths=0)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(10, len(names)), markerscale=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.6 / (panel * rows + 0.6), 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_layer_scores(rows: list[dict], path, title: str = "", dpi: int = 110) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    x = np.arange(len(rows))
    keys = [("kmeans_v_measure", "-o"), ("agglomerative_v_measure", "-s"),
            ("kmeans_homogeneity", "--"), ("kmeans_completeness", ":")]
    keys += [(k, "-.") for k in rows[0] if k.startswith("kmeans_v_measure_")]  # other labelings
    for key, style in keys:
        ax.plot(x, [r[key] for r in rows], style, label=key.replace("_", " "))
    ax.set_xticks(x)
    ax.set_xticklabels([r["layer"] for r in rows], rotation=75, fontsize=7)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
