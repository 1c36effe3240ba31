"""Figure of the detection protocol (DGR paper Table 3 as curves), written as PNG.

Matplotlib's object-oriented API only (no pyplot, no backend switch), imported
inside the function so the detection package imports without it.
"""
from __future__ import annotations

CLASSIFIER_LABELS = {"random_forest": "random forest", "adaboost": "AdaBoost", "gradient_boosting": "gradient boosting"}
FEATURE_LABELS = {"cdrp": "CDRP", "features": "penultimate activations"}
_COLORS = {"random_forest": "tab:green", "adaboost": "tab:orange", "gradient_boosting": "tab:purple"}
_FEATURE_STYLES = ("-o", "--s", "-.^", ":v")


def plot_detection(dets: dict[str, dict[str, list[dict]]], path, *,
                   feature_labels: dict[str, str] = FEATURE_LABELS,
                   classifier_labels: dict[str, str] = CLASSIFIER_LABELS, dpi: int = 90) -> None:
    """One panel per attack setting: test AUC (mean ± std over runs) vs training images per
    class, one line per classifier and feature.

    ``dets``: ``{panel title: {feature: evaluate_protocol rows}}``; features are drawn in the
    order of ``feature_labels`` (the first solid, the next dashed, ...) and must all be present.
    """
    if len(feature_labels) > len(_FEATURE_STYLES):
        raise ValueError(f"at most {len(_FEATURE_STYLES)} features per panel, got {list(feature_labels)}")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * len(dets), 3.9))
    axes = fig.subplots(1, len(dets), squeeze=False)
    for ax, (title, det) in zip(axes[0], dets.items()):
        for feat, style in zip(feature_labels, _FEATURE_STYLES):
            rows = det[feat]
            for c in dict.fromkeys(r["classifier"] for r in rows):
                rr = [r for r in rows if r["classifier"] == c]
                ax.errorbar([r["per_class"] for r in rr], [r["auc_mean"] for r in rr], [r["auc_std"] for r in rr],
                            fmt=style, color=_COLORS.get(c), capsize=3, ms=4,
                            label=f"{classifier_labels.get(c, c)} on {feature_labels[feat]}")
        ax.set_xscale("log")
        ax.minorticks_off()
        sizes = sorted({r["per_class"] for r in det[next(iter(feature_labels))]})
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("training images per class (each with its adversarial twin)")
        ax.set_ylabel("test AUC (mean ± std over runs)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
