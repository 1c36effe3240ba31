"""How routing paths diverge under attack (DGR paper Sec. 4.3, Fig. 8).

For each adversarial image and each gate layer: the Pearson correlation of
its gates with (a) its original image's gates and (b) the routing paths of
real images of the class the attack reached (the mean of those images'
gates at that layer).  The paper finds (a) high in early layers and falling
with depth, while (b) rises with depth: the attack re-routes the deep layers
onto the target class's path.
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
                       spec: GateSpec) -> dict[str, np.ndarray]:
    """Per-layer correlations, each (N, L): ``to_original`` and ``to_reached_class``."""
    reached = np.asarray(reached)
    if np.isnan(class_paths[reached]).any():
        raise ValueError("some reached classes have no real-image paths to compare with")
    a, o, t = split_layers(adv, spec), split_layers(orig, spec), split_layers(class_paths[reached], spec)
    return {
        "to_original": np.stack([rowwise_corr(a[n], o[n]) for n in spec.names], 1),
        "to_reached_class": np.stack([rowwise_corr(a[n], t[n]) for n in spec.names], 1),
    }


def plot_correlations(corrs: dict[str, dict[str, np.ndarray]], spec: GateSpec, path, title: str = "") -> None:
    """Line plot of mean correlations per layer and violins of their spread, one row per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(corrs)
    fig, axes = plt.subplots(n, 2, figsize=(13, 3.4 * n), squeeze=False)
    x = np.arange(len(spec))
    for row, (setting, c) in enumerate(corrs.items()):
        ax = axes[row, 0]
        for key, color in (("to_original", "tab:blue"), ("to_reached_class", "tab:red")):
            m, s = c[key].mean(0), c[key].std(0)
            ax.plot(x, m, "-o", color=color, ms=3, label=key.replace("_", " "))
            ax.fill_between(x, m - s, m + s, color=color, alpha=0.15)
        ax.set_title(f"{setting}: mean ± std", fontsize=9)
        ax.set_ylim(-0.2, 1.05)
        ax.set_xticks(x)
        ax.set_xticklabels(spec.names, rotation=80, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        for key, color, off in (("to_original", "tab:blue", -0.2), ("to_reached_class", "tab:red", 0.2)):
            parts = ax.violinplot([c[key][:, i] for i in x], positions=x + off, widths=0.35, showmedians=True)
            for b in parts["bodies"]:
                b.set_facecolor(color)
                b.set_alpha(0.4)
        ax.set_title(f"{setting}: distribution (blue: to original, red: to reached class)", fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(spec.names, rotation=80, fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
