"""How routing paths diverge under attack (DGR paper Sec. 4.3, Fig. 8).

For each adversarial image and each gate layer: the Pearson correlation of
its gates with (a) its original image's gates and (b) the routing path of
the class the attack reached, represented by the mean of real images'
gates of that class at that layer.  The paper finds (a) high in early
layers and falling with depth, while (b) rises with depth: the attack
re-routes the deep layers onto the target class's path.

Because (a) compares two single images and (b) compares with a class
*mean* (which is smoother, so correlations with it run higher), two
like-for-like references are available: (c) ``to_source_class``, the
adversarial gates against the mean path of the original image's class,
and (d) the correlation of real images with their own class's mean path
(:func:`layer_correlations` with ``adv = orig = real`` and ``reached =
labels``), the level a genuine member of a class reaches.

Deviation: the paper does not say how "images of the target class" enter
the correlation; we use their mean path (the experiment takes it from
held-out real images the model classifies correctly).
"""
from __future__ import annotations

import numpy as np

from jaxroute.analysis.layers import split_layers
from jaxroute.models.gates import GateSpec


def rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows; 0 where a row is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(-1) / den
    return np.where(den > 0, r, 0.0)


def class_mean_paths(cdrp: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, D) mean CDRP of the real images of each class (NaN for an absent class)."""
    cdrp, labels = np.asarray(cdrp), np.asarray(labels)
    out = np.full((num_classes, cdrp.shape[1]), np.nan)
    for k in range(num_classes):
        if np.any(labels == k):
            out[k] = cdrp[labels == k].mean(0)
    return out


def layer_correlations(adv: np.ndarray, orig: np.ndarray, reached: np.ndarray, class_paths: np.ndarray,
                       spec: GateSpec, source: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-layer correlations, each (N, L): ``to_original`` (the original image's gates),
    ``to_reached_class`` (the mean path of class ``reached``) and, when ``source`` (the
    original images' classes) is given, ``to_source_class``."""
    reached = np.asarray(reached)
    classes = reached if source is None else np.concatenate([reached, np.asarray(source)])
    if np.isnan(class_paths[classes]).any():
        raise ValueError("some reached (or source) classes have no real-image paths to compare with")
    if len(adv) != len(orig) or len(adv) != len(reached):
        raise ValueError(f"adv, orig and reached must have one row per adversarial image: "
                         f"{len(adv)}, {len(orig)}, {len(reached)}")
    a, o, t = split_layers(adv, spec), split_layers(orig, spec), split_layers(class_paths[reached], spec)
    out = {
        "to_original": np.stack([rowwise_corr(a[n], o[n]) for n in spec.names], 1),
        "to_reached_class": np.stack([rowwise_corr(a[n], t[n]) for n in spec.names], 1),
    }
    if source is not None:
        s = split_layers(class_paths[np.asarray(source)], spec)
        out["to_source_class"] = np.stack([rowwise_corr(a[n], s[n]) for n in spec.names], 1)
    return out


STYLES = {  # key -> (colour, line style, legend label)
    "to_original": ("tab:blue", "-o", "adv vs its original image"),
    "to_source_class": ("tab:cyan", "--", "adv vs original class's mean path"),
    "to_reached_class": ("tab:red", "-o", "adv vs reached class's mean path"),
}


def plot_correlations(corrs: dict[str, dict[str, np.ndarray]], spec: GateSpec, path, title: str = "",
                      reference: np.ndarray | None = None) -> None:
    """Line plot of mean correlations per layer and violins of their spread, one row per setting.

    ``reference`` ((N, L) or (L,)): real images against their own class's mean path,
    drawn as a grey dashed line in every row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(corrs)
    fig, axes = plt.subplots(n, 2, figsize=(13, 3.0 * n), squeeze=False)
    x = np.arange(len(spec))
    ref = None if reference is None else np.asarray(reference).reshape(-1, len(spec)).mean(0)
    for row, (setting, c) in enumerate(corrs.items()):
        ax = axes[row, 0]
        for key, (color, style, label) in STYLES.items():
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
    plt.close(fig)
