"""Network decoupling on CIFAR-10 with the pretrained ResNet-20: Table 2 (control vs decoupled),
Fig. 4 (energetic / silent / dynamic filters per layer), per-layer V-measure of the paths
against the classes, and the single-thread speed of the gathered forward.

    python -m experiments.decoupling --out reports/decoupling                 # the report schedule
    python -m experiments.decoupling --out /tmp/dec --limit 512 --epochs 1    # a smoke run

Schedule (the report's short one): ``--frozen-epochs`` (3) epochs training the
controllers only at lr 0.1, then ``--epochs`` (12) joint epochs at lr 0.01,
divided by 10 at 50 % and 75 %; the paper's losses and weights.  The control
fine-tunes the plain network on the same data for the same joint epochs with CE only
(:func:`jaxroute.training.fit`: SGD, Nesterov momentum 0.9, cosine lr from 0.01,
weight decay 1e-4, crop + flip), since fine-tuning on the JPEG images alone moves accuracy.

Resumable: each stage writes its JSON into ``OUT`` and is skipped when that file exists;
the decoupled training itself resumes from its per-epoch checkpoint (``OUT/decoupled``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _stage(out: Path, name: str, fn):
    f = out / f"{name}.json"
    if f.is_file():
        return json.loads(f.read_text())
    res = fn()
    f.write_text(json.dumps(res, indent=1))
    return res


def v_measures(z: dict, labels: np.ndarray) -> dict:
    """Per layer: V-measure between the classes and the clusters 'inputs with the same layer path'."""
    from sklearn.metrics import v_measure_score

    out = {}
    for p, v in z.items():
        _, cluster = np.unique(np.asarray(v) > 0.5, axis=0, return_inverse=True)
        out[p] = float(v_measure_score(labels, cluster.ravel()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default=str(SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"))
    ap.add_argument("--data", default=str(SHARED / "data/cifar10-jpeg"))
    ap.add_argument("--limit", type=int, default=None, help="first N train and test images (smoke runs)")
    ap.add_argument("--frozen-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12, help="joint epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args(argv)

    import jax

    from jaxroute.data import load_dataset
    from jaxroute.decoupling.model import calculation_paths, decoupled_model, save_decoupled
    from jaxroute.decoupling.train import DecoupleConfig, evaluate, train_decoupled
    from jaxroute.training import TrainConfig, fit
    from jaxroute.training.train import eval_logits, topk_accuracy
    from jaxroute.weights import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset(args.data, "train", limit=args.limit)
    test = load_dataset(args.data, "test", limit=args.limit)
    cfg = DecoupleConfig(epochs=args.frozen_epochs + args.epochs, freeze_backbone_epochs=args.frozen_epochs,
                         batch_size=args.batch_size, lr=0.1, joint_lr=0.01)

    def decoupled():
        model = decoupled_model("resnet20", args.weights, key=jax.random.key(0))
        variables, history = train_decoupled(model, train, out / "decoupled", cfg, log=print)
        model = model.with_variables(variables)
        save_decoupled(out / "decoupled", model, overwrite=True)
        res = evaluate(model, test)
        z = {}
        for i in range(0, len(test.labels), 256):
            for p, v in calculation_paths(model, test.images[i:i + 256]).items():
                z.setdefault(p, []).append(np.asarray(v))
        res["v_measure"] = v_measures({p: np.concatenate(v) for p, v in z.items()}, np.asarray(test.labels))
        res["history"] = history
        return res

    def control():
        plain = load_model("resnet20", args.weights)
        before = topk_accuracy(eval_logits(plain, test), np.asarray(test.labels))
        tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01, weight_decay=1e-4,
                         flip=True, pad_crop=4)
        tuned = plain.with_variables(fit(plain, train, tc, progress=False, log=print))
        after = topk_accuracy(eval_logits(tuned, test), np.asarray(test.labels))
        return {"pretrained": before, "fine_tuned": after}

    dec = _stage(out, "decoupled", decoupled)
    ctl = _stage(out, "control", control)
    speed = None
    if not args.no_speed:
        from benchmarks.decoupling import main as bench

        speed = _stage(out, "speed", lambda: bench(["--weights", str(out / "decoupled"), "--data", args.data,
                                                    "--backbone", args.weights, "--out", str(out / "speed_raw.json")]
                                                   + (["--quick"] if args.limit else [])))
    lines = ["# Network decoupling, CIFAR-10 ResNet-20", "",
             "| model | top-1 | top-5 | MACs (M) |", "| --- | --- | --- | --- |",
             f"| pretrained | {ctl['pretrained']['top1']:.4f} | {ctl['pretrained']['top5']:.4f} | "
             f"{dec['macs_dense'] / 1e6:.2f} |",
             f"| control (fine-tuned, CE) | {ctl['fine_tuned']['top1']:.4f} | {ctl['fine_tuned']['top5']:.4f} | "
             f"{dec['macs_dense'] / 1e6:.2f} |",
             f"| decoupled | {dec['test_top1']:.4f} | {dec['test_top5']:.4f} | {dec['macs_mean'] / 1e6:.2f} "
             f"({dec['macs_reduction']:.2f}x fewer) |", "",
             "## Filters per layer (Fig. 4)", "", "| layer | energetic | silent | dynamic | V-measure |",
             "| --- | --- | --- | --- | --- |"]
    for p, d in dec["filter_states"]["per_layer"].items():
        lines.append(f"| {p} | {d['energetic']} | {d['silent']} | {d['dynamic']} | {dec['v_measure'][p]:.3f} |")
    if speed:
        lines += ["", "## Single-thread speed, batch 1 (median ms)", "",
                  " | ".join(f"{k} {v:.2f}" for k, v in speed["median_ms_b1"].items()),
                  f"gathered vs dense {speed['speedup_gathered_vs_dense']:.2f}x, MAC ratio {speed['mac_ratio']:.2f}x"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
