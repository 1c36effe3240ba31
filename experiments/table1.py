"""Reproduce the DGR paper's Table 1 and Fig. 3 on CIFAR-10 with the pretrained ResNet-20.

    python -m experiments.table1 --out reports/table1 [--limit 1000]

Routes the first ``limit`` test images (class-interleaved: 100 per class for
1,000) with DGR, AWR and AAR through the resumable extraction job (so an
interrupted run continues where it stopped), then writes
``table1.md`` (full model vs AWR vs AAR vs DGR: top-1, top-5, sparsity
mean ± std), ``ablation.png`` / ``ablation.json`` (Fig. 3: accuracy when
the top- or bottom-valued critical nodes of the DGR paths are deactivated)
and ``layer_sparsity.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default="reports/table1")
    ap.add_argument("--weights", default=str(SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"))
    ap.add_argument("--data", default=str(SHARED / "data/cifar10-jpeg"))
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--methods", default="dgr,awr,aar")
    args = ap.parse_args(argv)

    import jax

    from jaxroute.data import load_dataset
    from jaxroute.routing import DGRConfig, ablation_curve, plot_ablation
    from jaxroute.routing.job import RouteJob, load_shards, run_route_job
    from jaxroute.weights import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model("resnet20", args.weights)
    spec = loaded.spec
    ds = load_dataset(args.data, "test", limit=args.limit)
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    print(f"{len(ds.labels)} test images, per class {counts.tolist()}", file=sys.stderr)

    rows, summaries = [], {}
    for method in args.methods.split(","):
        job = RouteJob(model="resnet20", weights=args.weights, data=args.data, split="test", limit=args.limit,
                       method=method, batch_size=args.batch_size, shard_size=args.batch_size * 5)
        summaries[method] = run_route_job(loaded, ds, out / method, job)
    any_summary = next(iter(summaries.values()))
    rows.append(("Full model", any_summary["full_top1"], any_summary["full_top5"], 1.0, 0.0))
    names = {"awr": "AWR", "aar": "AAR", "dgr": "DGR"}
    for method, s in summaries.items():
        rows.append((names[method], s["top1_accuracy"], s["top5_accuracy"], s["sparsity"], s["sparsity_std"]))

    lines = [
        f"ResNet-20 (pretrained), CIFAR-10 JPEG test set, first {len(ds.labels)} images "
        f"({counts.min()}-{counts.max()} per class); DGR T=30, lr 0.1, momentum 0.9, "
        f"gamma {DGRConfig().gamma}, clip [0, 10]; AWR/AAR prune 2%/iteration.",
        "",
        "| method | top-1 | top-5 | sparsity (fraction of gates > 0) |",
        "|---|---:|---:|---:|",
    ]
    for name, t1, t5, sp, sd in rows:
        lines.append(f"| {name} | {100 * t1:.2f}% | {100 * t5:.2f}% | "
                     + ("100% (all gates)" if name == "Full model" else f"{100 * sp:.2f}% ± {100 * sd:.2f}%")
                     + " |")
    for method, s in summaries.items():
        lines.append("")
        lines.append(f"{names[method]}: top-1 agreement with the full model {100 * s['top1_agreement']:.2f}%, "
                     f"fallback fraction {100 * s['fallback_fraction']:.2f}%"
                     + (f", {s['images_per_s']:.1f} images/s" if s.get("images_per_s") else ""))

    curves = []
    if "dgr" in summaries:
        sh = load_shards(out / "dgr")
        fractions = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
        for order in ("top", "bottom"):
            c = ablation_curve(loaded.logits_fn(), spec, ds.images, ds.labels, sh["cdrp"], fractions, order)
            c["label"] = f"deactivate {order}-valued critical nodes"
            curves.append(c)
        plot_ablation(curves, out / "ablation.png", "ResNet-20 / CIFAR-10: ablation of DGR critical nodes")
        (out / "ablation.json").write_text(json.dumps(curves, indent=1))
        lines += ["", "Ablation (Fig. 3), top-1 / top-5 accuracy of the full model with a fraction of each "
                  "image's critical nodes deactivated:", "",
                  "| fraction | top-valued off: top-1 | top-5 | bottom-valued off: top-1 | top-5 |",
                  "|---:|---:|---:|---:|---:|"]
        for i, f in enumerate(fractions):
            lines.append(f"| {f:.2f} | {100 * curves[0]['top1'][i]:.1f}% | {100 * curves[0]['top5'][i]:.1f}% | "
                         f"{100 * curves[1]['top1'][i]:.1f}% | {100 * curves[1]['top5'][i]:.1f}% |")
        _plot_layer_sparsity(summaries, spec, out / "layer_sparsity.png")
    (out / "table1.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({m: {k: s[k] for k in ("top1_accuracy", "top5_accuracy", "sparsity", "sparsity_std")}
                      for m, s in summaries.items()}))
    return 0


def _plot_layer_sparsity(summaries, spec, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.5))
    for method, s in summaries.items():
        ax.plot(range(len(spec)), [s["layer_sparsity"][n] for n in spec.names], marker="o", label=method.upper())
    ax.set_xticks(range(len(spec)))
    ax.set_xticklabels(spec.names, rotation=75, fontsize=7)
    ax.set_ylabel("fraction of gates > 0")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
