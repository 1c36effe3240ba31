"""Network dissection under attack (Xie's Table 2, Fig. 5-7) with the pretrained CIFAR-10 ResNet-20/32.

    python -m experiments.dissection --out reports/dissection [--limit 10000] [--models resnet20,resnet32]

Writes the offline concept set (CIFAR-10 test images with colour masks and
class labels, plus generated DTD textures; :mod:`jaxroute.dissection.concepts`)
once under ``OUT/cache/concepts``, then dissects the stage outputs of each
model (``layer1.<last>``, ``layer2.<last>``, ``layer3.<last>``) clean and under
untargeted FGSM at every ``--eps`` (default 0.0112, Xie's code's budget in
[0, 1] pixels, and 1, 2, 4, 8/255), with the thresholds recomputed on the
adversarial images and with the clean ones reused.  Every (model, layer,
condition) result is cached under ``OUT/cache/<model>/`` keyed by layer and
concept data, so a killed run resumes where it stopped.  Outputs:
``table2.md`` (detector ratio per model, layer and condition, by category),
``results.json``, ``ratios.png`` (detector ratio per layer, Fig. 5-7 style),
``top-<model>-<layer>.png`` (Fig. 8: top images of the best units of the last
stage with their masks, clean and under the first ``--eps`` with the clean
thresholds) and ``caps.json`` (the IoU caps of the image-level labels).

The missing experiment (Xie et al. propose adversarial training with CORAL and
MMD but never run it): each model of ``--advtrain-models`` (default: every model)
is fine-tuned on the CIFAR-10 training split (``--train-limit`` first images) for
``--advtrain-epochs`` epochs (default 3; 0 skips it) with the library's one adversarial-training step
(:mod:`jaxroute.training.adversarial`, ``objective="xie"``: untargeted FGSM on
the model's predictions at ε = 0.0112, CE + CE_adv) in three settings,
beside the pretrained model:

* ``FGSM training``: λ_con = λ_coral = λ_mmd = 0, no adaptation layer;
* ``+ Eq. 7``: λ_con = 1/3 (‖φ(x) − φ(x_adv)‖², Dong et al.'s term);
* ``+ CORAL + MMD``: λ_con = λ_coral = λ_mmd = 1/3 behind the identity-initialised
  adaptation layer (the weights are an ATDA reimplementation's, unverified).

Each is scored by clean, FGSM and PGD top-1 on the first ``--limit`` test
images (:func:`~jaxroute.training.adversarial.robust_accuracy`: ε = 0.0112,
PGD L∞ with random start, 10 steps of ε/4) and dissected at the stage outputs
clean and under FGSM at ε = 0.0112 with recomputed thresholds.  Runs resume
per epoch under ``OUT/cache/advtrain/``; results go to ``advtrain.json`` and
the last section of ``table2.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CKPTS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}
EPS = (0.0112, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
ADV_EPS = 0.0112
# the adversarial-training settings beside the pretrained model: AdvTrainConfig(objective="xie", ...) overrides
LADDER = (("FGSM training", "fgsm", {"beta": 0.0, "lambda_coral": 0.0, "lambda_mmd": 0.0, "adaptation": False}),
          ("+ Eq. 7", "fgsm-eq7", {"lambda_coral": 0.0, "lambda_mmd": 0.0, "adaptation": False}),
          ("+ CORAL + MMD", "fgsm-eq7-coral-mmd", {}))


def stage_outputs(model) -> list[str]:
    """The last block output of each stage (``layerS.B`` gate points, the largest B per S)."""
    last: dict[str, str] = {}
    for name in model.spec.names:
        m = re.fullmatch(r"(layer\d+)\.(\d+)", name)
        if m:
            last[m.group(1)] = name
    return [last[k] for k in sorted(last)]


def concepts(out: Path, data: str, limit: int | None, table: Path):
    from jaxroute.data import load_dataset
    from jaxroute.dissection import read_broden
    from jaxroute.dissection.concepts import build_concepts

    folder = out / "cache" / "concepts"
    if (folder / "index.csv").exists():
        return read_broden(folder)
    ds = load_dataset(data, "test", limit=limit)
    images = np.asarray(np.rint(np.asarray(ds.images) * 255), np.uint8)
    return build_concepts(folder, images, ds.labels, ds.class_names, table)


def bars(rows: list[dict], path: Path) -> None:
    import matplotlib.figure

    fig = matplotlib.figure.Figure(figsize=(8, 3.5))
    conds = sorted({r["condition"] for r in rows}, key=lambda c: (c != "clean", c))
    keys = sorted({(r["model"], r["layer"]) for r in rows})
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / max(1, len(conds))
    for j, c in enumerate(conds):
        vals = [next((r["detector_ratio"] for r in rows if (r["model"], r["layer"]) == k and r["condition"] == c),
                     np.nan) for k in keys]
        ax.bar(np.arange(len(keys)) + j * w, vals, w, label=c)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2, [f"{m}\n{l}" for m, l in keys], fontsize=7)
    ax.set_ylabel("detector units")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def top_images(model, broden, layer: str, cache: Path, adv_cond: str, eps: float, path: Path, units: int = 4,
               k: int = 4) -> None:
    """Fig. 8: the clean top images of the best-scoring units with their masks, and the same images after
    FGSM with the adversarial masks (the unit's label and IoU, clean and adversarial, in the titles)."""
    import jax.numpy as jnp
    import matplotlib.figure

    from jaxroute.dissection.dissect import activation_fn, to_unit_float, upsample_bilinear
    from jaxroute.dissection.job import transform_for

    folder = cache / layer
    clean, adv = np.load(folder / "clean" / "tally.npz"), np.load(folder / adv_cond / "tally.npz")
    names = broden.label_names()
    chosen = np.argsort(-clean["score"], kind="stable")[:units]
    fig = matplotlib.figure.Figure(figsize=(1.6 * k, 1.8 * 2 * units))
    size = broden.mask_shape()
    for r, u in enumerate(chosen):
        top = np.argsort(-clean["image_max"][:, u], kind="stable")[:k]
        x = to_unit_float(np.stack([next(broden.records(int(i), int(i) + 1)).image for i in top]))
        lab = int(clean["label"][u])
        for j, (tag, res, transform) in enumerate((("clean", clean, None),
                                                  (f"FGSM {eps:.4g}", adv, transform_for(model, "fgsm", eps)))):
            acts = activation_fn(model, [layer], transform)
            xs = np.asarray(transform(jnp.asarray(x))) if transform else x
            up = np.asarray(upsample_bilinear(acts(jnp.asarray(x))[layer], size))[:, u]
            mask = up > res["thresholds"][u]
            for c in range(k):
                ax = fig.add_subplot(2 * units, k, (2 * r + j) * k + c + 1)
                ax.imshow(np.clip(xs[c], 0, 1) * np.where(mask[c], 1.0, 0.35)[..., None], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_title(f"unit {u + 1} {names[lab]} {tag}: IoU {res['iou'][u, lab]:.3f}", fontsize=6,
                                 loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def advtrain_ladder(name: str, model, desc: dict, broden, layers: list[str], out: Path, args, config, log) -> list[dict]:
    """The pretrained model and the three adversarially trained ones: accuracies and detector ratios."""
    import jax

    from jaxroute.data import load_dataset
    from jaxroute.dissection import dissect_to_dir
    from jaxroute.training.adversarial import AdvTrainConfig, adversarial_fit, robust_accuracy
    from jaxroute.utils.io import atomic_write_json

    train = load_dataset(args.data, "train", limit=args.train_limit)
    test = load_dataset(args.data, "test", limit=args.limit)
    rows = []
    for label, slug, overrides in (("pretrained", "pretrained", None),) + LADDER:
        run = out / "cache" / "advtrain" / name / slug
        if overrides is None:
            m, training, fitted = model, None, None
            cache = out / "cache" / name  # the main table's dissections of the same model
            mdesc = desc
        else:
            cfg = AdvTrainConfig(objective="xie", epochs=args.advtrain_epochs, eps=ADV_EPS, **overrides)
            fitted = adversarial_fit(model, train, cfg, run, source={**desc, "train_limit": args.train_limit},
                                     log=log)
            m = model.with_variables(fitted["variables"])
            training = {"config": cfg.identity(), "n_train": len(train.labels)}
            cache = out / "cache" / f"{name}-{slug}"
            mdesc = {**desc, "advtrain": training}
        key = {"eps": ADV_EPS, "n_test": len(test.labels), "training": training}
        acc_file = run / "accuracy.json"
        acc = json.loads(acc_file.read_text()) if acc_file.is_file() else None
        if acc is None or acc.get("key") != json.loads(json.dumps(key)):
            log(f"{name} {label}: clean, FGSM and PGD accuracy on {len(test.labels)} test images")
            acc = {"key": key, **robust_accuracy(m, test, ADV_EPS, key=jax.random.key(0), batch_size=args.batch_size)}
            atomic_write_json(acc_file, acc)
        ratios = {}
        for attack, eps in (("none", None), ("fgsm", ADV_EPS)):
            res = dissect_to_dir(m, broden, layers, cache, model_desc=mdesc, config=config, attack=attack, eps=eps,
                                 log=log)
            for layer, summary in res.items():
                ratios.setdefault(layer, {})["clean" if attack == "none" else "fgsm"] = summary["detector_ratio"]
        last = fitted["epochs"][-1] if fitted else {}
        rows.append({"model": name, "training": label, "clean_top1": acc["clean_top1"],
                     "fgsm_top1": acc["fgsm_top1"], "pgd_top1": acc["pgd_top1"], "pgd": acc["pgd"],
                     "detector_ratio": ratios, "epochs": len(fitted["epochs"]) if fitted else 0,
                     "n_train": len(train.labels) if fitted else 0,
                     "losses": {k: v for k, v in last.items() if k not in ("seconds", "acc_clean", "acc_adv")},
                     "seconds_per_epoch": (float(np.mean([e["seconds"] for e in fitted["epochs"]]))
                                           if fitted else None)})
    return rows


def advtrain_table(rows: list[dict], args) -> str:
    if not rows:
        return ""
    layers = list(rows[0]["detector_ratio"])
    head = ("| model | training | clean top-1 | FGSM top-1 | PGD top-1 | "
            + " | ".join(f"{l} clean | {l} FGSM" for l in layers) + " |")
    lines = [head, "|---|---|---|---|---|" + "---|---|" * len(layers)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['training']} | {r['clean_top1']:.4f} | {r['fgsm_top1']:.4f} | "
                     f"{r['pgd_top1']:.4f} | " + " | ".join(
                         f"{100 * r['detector_ratio'][l]['clean']:.1f}% | {100 * r['detector_ratio'][l]['fgsm']:.1f}%"
                         for l in layers) + " |")
    n_train = max(r["n_train"] for r in rows)
    pgd = rows[0]["pgd"]
    return ("\n\n## Adversarial training (Xie's proposed experiment)\n\n"
            f"{args.advtrain_epochs} epoch(s) on {n_train} training images; untargeted FGSM on the model's "
            f"predictions at eps = {ADV_EPS} in training and test; PGD: L-inf, eps {pgd['eps']:.4g}, step "
            f"{pgd['alpha']:.4g}, {pgd['steps']} steps, random start.  lambda = 1/3 for each added term (an ATDA "
            "reimplementation's weights, unverified).  Detector ratios clean and under FGSM (recomputed "
            "thresholds).\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="reports/dissection")
    ap.add_argument("--data", default=str(SHARED / "data/cifar10-jpeg"))
    ap.add_argument("--models", default="resnet20,resnet32")
    ap.add_argument("--weights-dir", default=str(SHARED / "models/cifar10-resnet"))
    ap.add_argument("--color-table", default=str(SHARED / "data/color-names/w2color.npy"))
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default all 10,000)")
    ap.add_argument("--eps", default=",".join(f"{e:.6g}" for e in EPS))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--advtrain-epochs", type=int, default=3,
                    help="epochs of each adversarial training of the missing experiment (0 skips it)")
    ap.add_argument("--train-limit", type=int, default=None,
                    help="first N training images for the adversarial training (default all 50,000)")
    ap.add_argument("--advtrain-models", default=None,
                    help="comma-separated subset of --models that get the adversarial-training ladder "
                         "(default: all of them)")
    args = ap.parse_args(argv)
    if args.advtrain_epochs < 0:
        ap.error(f"--advtrain-epochs must be >= 0, got {args.advtrain_epochs}")
    models = args.models.split(",")
    for name in models:
        if name not in CKPTS:
            ap.error(f"--models: unknown model {name!r}; expected some of {', '.join(CKPTS)}")
    ladder_models = models if args.advtrain_models is None else args.advtrain_models.split(",")
    if not set(ladder_models) <= set(models):
        ap.error(f"--advtrain-models {args.advtrain_models!r} must be a subset of --models {args.models!r}")

    from jaxroute.cli.common import log
    from jaxroute.dissection import DissectConfig, dissect_to_dir
    from jaxroute.dissection.concepts import iou_caps
    from jaxroute.utils.io import atomic_write_json, atomic_write_text
    from jaxroute.weights import load_model

    out = Path(args.out)
    eps_list = [float(e) for e in args.eps.split(",") if e]
    broden = concepts(out, args.data, args.limit, Path(args.color_table))
    caps = iou_caps(broden)
    atomic_write_json(out / "caps.json", caps)
    config = DissectConfig(batch_size=args.batch_size)
    rows, adv_rows = [], []
    for name in models:
        weights = Path(args.weights_dir) / CKPTS[name]
        model = load_model(name, weights)
        layers = stage_outputs(model)
        desc = {"arch": name, "weights": weights.name, "gate_placement": model.gate_placement}
        cache = out / "cache" / name
        conds = [("none", None, False)] + [("fgsm", e, reuse) for e in eps_list for reuse in (False, True)]
        for attack, eps, reuse in conds:
            res = dissect_to_dir(model, broden, layers, cache, model_desc=desc, config=config, attack=attack, eps=eps,
                                 reuse_thresholds=reuse, log=log)
            cond = "clean" if attack == "none" else f"FGSM {eps:.4g} ({'reused' if reuse else 'recomputed'} T)"
            for layer, s in res.items():
                rows.append(dict(s, model=name, layer=layer, condition=cond))
        if eps_list:
            from jaxroute.dissection.job import condition_name

            top_images(model, broden, layers[-1], cache, condition_name("fgsm", eps_list[0], True), eps_list[0],
                       out / f"top-{name}-{layers[-1]}.png")
        if args.advtrain_epochs and name in ladder_models:
            adv_rows += advtrain_ladder(name, model, desc, broden, layers, out, args, config, log)
    atomic_write_json(out / "results.json", rows)
    if adv_rows:
        atomic_write_json(out / "advtrain.json", adv_rows)
    cats = list(broden.categories)
    lines = ["| model | layer | condition | units | detectors | ratio | " + " | ".join(cats) + " | concepts |",
             "|---|---|---|---|---|---|" + "---|" * len(cats) + "---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['condition']} | {r['units']} | {r['detectors']} | "
                     f"{100 * r['detector_ratio']:.1f}% | " + " | ".join(str(r["by_category"][c]) for c in cats)
                     + f" | {r['unique_concepts']} |")
    cap_lines = [f"- {c['label']}: f = {c['fraction']:.4f}, IoU cap q/f = {c['cap']:.4f}" for c in caps]
    atomic_write_text(out / "table2.md", "# Detector units, clean vs FGSM\n\n"
                      f"{len(broden)} concept images.\n\n" + "\n".join(lines)
                      + "\n\n## IoU caps of the image-level labels (q = 0.005)\n\n" + "\n".join(cap_lines) + "\n"
                      + advtrain_table(adv_rows, args))
    bars(rows, out / "ratios.png")
    print("\n".join(lines) + advtrain_table(adv_rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
