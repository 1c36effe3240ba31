"""Figures of the routing results (DGR paper Fig. 3, per-layer sparsity), written as PNG.

Matplotlib's object-oriented API only: a ``Figure`` renders to a file without
pyplot and without a GUI backend, so plotting never switches the process's
backend.  Matplotlib is imported inside each function, so the routing
package imports without it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from jaxroute.models.gates import GateSpec


def plot_ablation(curves: Sequence[dict], path, title: str = "Ablation of critical nodes") -> None:
    """Fig.-3-style curves (top-1 and top-5 accuracy versus the fraction of critical nodes
    deactivated), one line per ``ablation_curve`` result (legend: its ``label`` or order)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("top1", "top5")):
        for c in curves:
            ax.plot(c["fractions"], c[metric], marker="o", label=c.get("label", c["order"]))
        ax.set_xlabel("fraction of critical nodes deactivated")
        ax.set_ylabel(f"{metric} accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_layer_sparsity(per_method: Mapping[str, Mapping[str, float]], spec: GateSpec, path) -> None:
    """Fraction of gates > 0 per gate layer, one line per method.

    ``per_method``: ``{legend label: {gate layer: sparsity}}``, e.g. the routing job
    summaries' ``layer_sparsity``; layers are drawn in the forward order of ``spec``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots()
    for label, sparsity in per_method.items():
        ax.plot(range(len(spec)), [sparsity[n] for n in spec.names], marker="o", label=label)
    ax.set_xticks(range(len(spec)))
    ax.set_xticklabels(spec.names, rotation=75, fontsize=7)
    ax.set_ylabel("fraction of gates > 0")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_iterate_density(density: Sequence[float], path, title: str = "Gates > 0 at each DGR iterate") -> None:
    """Mean fraction of gates > 0 of every DGR iterate Λ_0..Λ_T (``dgr_trace``), one line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    ax.plot(range(len(density)), density, marker="o", markersize=3)
    ax.set_xlabel("iterate t (Λ_t)")
    ax.set_ylabel("fraction of gates > 0")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
