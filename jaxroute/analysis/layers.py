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
from sklearn.neighbors import NearestNeighbors

from jaxroute.models.gates import GateSpec
from jaxroute.utils.checks import check_int


def split_layers(cdrp: np.ndarray, spec: GateSpec) -> dict[str, np.ndarray]:
    """``{gate layer: (N, C)}`` of a CDRP matrix (N, D), cut by :meth:`GateSpec.split`.

    Only a matrix is accepted: the analyses treat rows as images, so a single flat
    path or a batch of batches is a caller's mistake worth naming.
    """
    cdrp = np.asarray(cdrp)
    if cdrp.ndim != 2 or cdrp.shape[1] != spec.size:
        raise ValueError(f"CDRP matrix must be (N, {spec.size}) for this gate layout, got {cdrp.shape}")
    return spec.split(cdrp)


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


def embed_paths(paths: np.ndarray, *, pca_dims: int = 300, seed: int = 0) -> np.ndarray:
    """(N, 2) t-SNE of whole paths after a PCA to ``min(pca_dims, N, D)`` dimensions.

    The usual recipe for t-SNE of long vectors (van der Maaten and Hinton keep 30-50
    components; Li et al. do not say): the PCA removes noise dimensions and makes
    t-SNE's neighbour search cheap.  Perplexity as :func:`embed_layers`.  When all
    paths are the same, every point is the origin.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(paths, np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"paths must be an (N, D) matrix with N >= 3, got shape {x.shape}")
    check_int(pca_dims, "pca_dims")
    if not np.ptp(x, axis=0).any():
        # one path for every input: one point (t-SNE's PCA start would divide by a zero spread)
        return np.zeros((len(x), 2))
    x = PCA(n_components=min(int(pca_dims), *x.shape), random_state=seed).fit_transform(x)
    return TSNE(n_components=2, init="pca", random_state=seed,
                perplexity=min(30.0, max(1.0, (len(x) - 1) / 3))).fit_transform(x)


def layer_fractions(paths: np.ndarray, spec: GateSpec) -> np.ndarray:
    """(N, L): per path and gate layer, the fraction of the layer's gates that are on (> 0)."""
    return np.stack([(g > 0).mean(1) for g in split_layers(paths, spec).values()], 1)


def depth_trend(rows: list[dict], keys: Sequence[str], parts: dict[str, np.ndarray],
                min_layers: int = 3) -> dict[str, dict[str, dict]]:
    """Spearman rank correlation of per-layer scores with the layer index.

    ``rows`` are :func:`layer_clustering_scores` rows in forward order; ``parts`` maps a
    name to a boolean mask over the rows (e.g. a ResNet's block outputs vs the gates inside
    its blocks, which behave differently).  A part with fewer than ``min_layers`` layers is
    left out; a part whose scores are constant has no rank correlation (``None``).
    Returns ``{key: {part: {"spearman_rho", "p_value", "layers"}}}``.
    """
    from scipy.stats import spearmanr

    depth = np.arange(len(rows))
    trend = {}
    for key in keys:
        v = np.array([r[key] for r in rows])
        trend[key] = {}
        for part, sel in parts.items():
            sel = np.asarray(sel, bool)
            if sel.sum() < min_layers:
                continue
            if np.ptp(v[sel]) == 0:
                trend[key][part] = {"spearman_rho": None, "p_value": None, "layers": int(sel.sum())}
                continue
            rho, p = spearmanr(depth[sel], v[sel])
            trend[key][part] = {"spearman_rho": float(rho), "p_value": float(p), "layers": int(sel.sum())}
    return trend


def neighbour_fraction(xy: np.ndarray, member: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the ``k`` nearest neighbours of a member point that are members too.

    Asks whether a group (e.g. the dense paths) forms its own region of an embedding:
    compare it with the group's overall fraction, ``member.mean()``.
    """
    member = np.asarray(member, bool)
    if len(xy) != len(member):
        raise ValueError(f"{len(xy)} points but {len(member)} membership flags")
    if not member.any() or len(xy) <= k:
        raise ValueError(f"need at least one member and more than {k} points, got {member.sum()} of {len(xy)}")
    idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy, return_distance=False)[:, 1:]
    return float(member[idx][member].mean())
