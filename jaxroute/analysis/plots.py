"""Figures of the routing-path analyses (DGR paper Fig. 4-8), written as PNG.

Matplotlib's object-oriented API only: a ``Figure`` renders to a file without
pyplot and without a GUI backend, so plotting neither switches the process's
backend nor keeps figures alive in pyplot's registry.  Matplotlib is imported
inside each function, so the analysis package imports without it.
"""
from __future__ import annotations

import numpy as np

from jaxroute.models.gates import GateSpec


def plot_embeddings(emb: dict[str, np.ndarray], labels, class_names, path, title: str = "", *,
                    cols: int = 4, panel: float = 3.2, dpi: int = 110) -> None:
    """One scatter panel per layer of a 2-D embedding (``embed_layers``), coloured by class,
    with one shared legend below."""
    import matplotlib
    from matplotlib.figure import Figure

    n = len(emb)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(panel * cols, panel * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = np.asarray(labels)
    cmap = matplotlib.colormaps["tab10"]
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


def plot_layer_scores(rows: list[dict], path, title: str = "", dpi: int = 110) -> None:
    """Clustering scores per layer (``layer_clustering_scores`` rows), one line per score;
    V-measures against other labelings (``kmeans_v_measure_<name>``) dash-dotted."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots()
    x = np.arange(len(rows))
    keys = [("kmeans_v_measure", "-o"), ("agglomerative_v_measure", "-s"),
            ("kmeans_homogeneity", "--"), ("kmeans_completeness", ":")]
    keys += [(k, "-.") for k in rows[0] if k.startswith("kmeans_v_measure_")]
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


def plot_clusters(images: np.ndarray, ids: np.ndarray, path, per_cluster: int = 12, title: str = "",
                  order: np.ndarray | None = None, mark: np.ndarray | None = None,
                  row_notes: list[str] | None = None, dpi: int = 90) -> None:
    """One row of up to ``per_cluster`` images per cluster (cluster size in the row label).

    ``order``: a score per image; each row shows its cluster's lowest-scoring images first
    (e.g. ``centroid_distance``, most typical first).  ``mark``: bool per image, drawn with
    a red frame (e.g. misclassified).  ``row_notes``: extra text per cluster label.
    """
    from matplotlib.figure import Figure

    ids = np.asarray(ids)
    k = int(ids.max()) + 1
    fig = Figure(figsize=(per_cluster * 0.75 + 1.0, k * 0.8 + 0.4))
    axes = fig.subplots(k, per_cluster, squeeze=False)
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


CORRELATION_STYLES = {  # layer_correlations key -> (colour, line style, legend label)
    "to_original": ("tab:blue", "-o", "adv vs its original image"),
    "to_source_class": ("tab:cyan", "--", "adv vs original class's mean path"),
    "to_reached_class": ("tab:red", "-o", "adv vs reached class's mean path"),
}


def plot_correlations(corrs: dict[str, dict[str, np.ndarray]], spec: GateSpec, path, title: str = "",
                      reference: np.ndarray | None = None) -> None:
    """Line plot of mean correlations per layer and violins of their spread, one row per setting.

    ``corrs``: ``{setting: layer_correlations(...)}``.  ``reference`` ((N, L) or (L,)): real
    images against their own class's mean path, drawn as a grey dashed line in every row:
    the level a genuine member of a class reaches.
    """
    from matplotlib.figure import Figure

    n = len(corrs)
    fig = Figure(figsize=(13, 3.0 * n))
    axes = fig.subplots(n, 2, squeeze=False)
    x = np.arange(len(spec))
    ref = None if reference is None else np.asarray(reference).reshape(-1, len(spec)).mean(0)
    for row, (setting, c) in enumerate(corrs.items()):
        ax = axes[row, 0]
        for key, (color, style, label) in CORRELATION_STYLES.items():
            if key not in c:
                continue
            m, s = c[key].mean(0), c[key].std(0)
            ax.plot(x, m, style, color=color, ms=3, label=label)
            if style.endswith("o"):
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.12)
        if ref is not None:
            ax.plot(x, ref, "--", color="grey", label="real vs own class's mean path")
        n_img = len(next(iter(c.values())))
        ax.set_title(f"{setting} (n={n_img}): mean ± std", fontsize=9)
        ax.set_ylim(-0.2, 1.05)
        ax.set_ylabel("Pearson r", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(spec.names if row == n - 1 else [], rotation=80, fontsize=6)
        ax.grid(alpha=0.3)
        if row == 0:
            ax.legend(fontsize=7, loc="lower left")
        ax = axes[row, 1]
        for key, color, off in (("to_original", "tab:blue", -0.2), ("to_reached_class", "tab:red", 0.2)):
            parts = ax.violinplot([c[key][:, i] for i in x], positions=x + off, widths=0.35, showmedians=True)
            for b in parts["bodies"]:
                b.set_facecolor(color)
                b.set_edgecolor(color)
                b.set_alpha(0.35)
            for k in ("cbars", "cmins", "cmaxes", "cmedians"):
                if k in parts:
                    parts[k].set_color(color)
                    parts[k].set_linewidth(0.8)
        ax.set_title("per-image distribution (blue: vs original image, red: vs reached class)", fontsize=9)
        ax.set_ylim(-0.3, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels(spec.names if row == n - 1 else [], rotation=80, fontsize=6)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_layer_profiles(panels: dict[str, dict[str, np.ndarray]], layer_names, path, title: str = "", *,
                        images: dict[str, np.ndarray] | None = None, dpi: int = 90) -> None:
    """Per-layer curves, one panel per entry of ``panels`` ({panel title: {line label: (L,)}}),
    layers on a shared x axis; ``images`` ({caption: (H, W, C) in [0, 1]}) are shown in a
    column on the left (e.g. an image and its adversarial twin)."""
    from matplotlib.figure import Figure

    names = list(layer_names)
    n_img = len(images or {})
    fig = Figure(figsize=(11 + 1.6 * bool(n_img), 2.8 * len(panels) + 0.8))
    grid = fig.add_gridspec(max(len(panels), n_img), 2 if n_img else 1, width_ratios=[1, 6] if n_img else [1])
    x = np.arange(len(names))
    for i, (caption, im) in enumerate((images or {}).items()):
        ax = fig.add_subplot(grid[i, 0])
        ax.imshow(np.clip(np.asarray(im), 0, 1), interpolation="nearest")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    rows = max(len(panels), n_img)
    for i, (panel, lines) in enumerate(panels.items()):
        lo, hi = i * rows // len(panels), (i + 1) * rows // len(panels)
        ax = fig.add_subplot(grid[lo:hi, -1])
        for label, v in lines.items():
            v = np.asarray(v, float)
            if v.shape != (len(names),):
                raise ValueError(f"{panel!r} / {label!r}: need one value per layer ({len(names)}), got {v.shape}")
            ax.plot(x, v, "-o", ms=3, label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(names if i == len(panels) - 1 else [], rotation=75, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot_neuron_tops(real_images: np.ndarray, real_top: np.ndarray, adv_images: np.ndarray, adv_top: np.ndarray,
                     path, *, row_labels: list[str], adv_captions: list[list[str]] | None = None,
                     title: str = "", dpi: int = 80) -> None:
    """One row per neuron: its top real images, a gap, then its top adversarial images (Dong et al. Fig. 2/7).

    ``real_top`` (R, a) and ``adv_top`` (R, b) index ``real_images`` and
    ``adv_images`` (images in [0, 1], NHWC); ``row_labels`` one text per row;
    ``adv_captions`` an optional caption per adversarial image (e.g.
    "cat→truck", original class → target).
    """
    from matplotlib.figure import Figure

    real_top, adv_top = np.asarray(real_top), np.asarray(adv_top)
    rows, a = real_top.shape
    b = adv_top.shape[1]
    if adv_top.shape[0] != rows or len(row_labels) != rows:
        raise ValueError(f"need one row of real tops, adversarial tops and a label per neuron, got {rows}, "
                         f"{adv_top.shape[0]} and {len(row_labels)}")
    cols = a + 1 + b  # one empty column between the real and the adversarial images
    fig = Figure(figsize=(cols * 0.8 + 1.6, rows * 0.95 + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if c == a:
                continue
            adv = c > a
            j = c - a - 1 if adv else c
            im = (adv_images if adv else real_images)[(adv_top if adv else real_top)[r, j]]
            ax.imshow(np.clip(im.squeeze(), 0, 1), cmap="gray" if im.shape[-1] == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            if adv and adv_captions is not None:
                ax.set_title(adv_captions[r][j], fontsize=5, pad=1)
        axes[r, 0].text(-0.15, 0.5, row_labels[r], transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.99, top=0.88, bottom=0.02, wspace=0.05, hspace=0.25)
    for first, last, text in ((0, a - 1, "top real images"),
                              (a + 1, cols - 1, "top adversarial images (original → target)")):
        x0, x1 = axes[0, first].get_position().x0, axes[0, last].get_position().x1
        fig.text((x0 + x1) / 2, 0.915, text, ha="center", va="bottom", fontsize=8)
    fig.savefig(path, dpi=dpi)
