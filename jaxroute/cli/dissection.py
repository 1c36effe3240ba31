"""``jaxroute concepts`` (write the offline concept set in Broden format) and ``jaxroute dissect``
(network dissection of gate points, clean and under FGSM)."""
from __future__ import annotations

from pathlib import Path

from jaxroute.cli.common import add_data_args, add_model_args, check_new_output, log, model_from_args

VEHICLE = ("airplane", "automobile", "ship", "truck")  # the CIFAR-10 classes under WordNet "vehicle"
DEFAULT_COLOR_TABLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "color-names" / "w2color.npy"


def add_parsers(sub) -> None:
    s = sub.add_parser("concepts", help="write the CIFAR concept set (colours, textures, classes) in Broden format")
    add_data_args(s)
    s.add_argument("--out", required=True, help="Broden folder to write")
    s.add_argument("--color-table", default=None,
                   help=f"the 32x32x32 colour-name table w2color.npy (default {DEFAULT_COLOR_TABLE})")
    s.add_argument("--textures-per-name", type=int, default=None,
                   help="generated images per texture name (default: images per class of the data)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated textures")
    s.add_argument("--quantile", type=float, default=0.005, help="q of the IoU caps printed (default 0.005)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_concepts)

    s = sub.add_parser("dissect", help="network dissection of gate points on a Broden-format concept set")
    add_model_args(s)
    s.add_argument("--concepts", required=True, help="Broden-format folder (e.g. from `jaxroute concepts`)")
    s.add_argument("--layer", nargs="+", required=True, help="gate point name(s), e.g. layer3.2")
    s.add_argument("--quantile", type=float, default=0.005, help="P(a_k > T_k) (default 0.005)")
    s.add_argument("--iou-threshold", type=float, default=0.04, help="detector if IoU > this (default 0.04)")
    s.add_argument("--rules", choices=("lite", "bau"), default="lite",
                   help="NetDissect-Lite's tally rules (default) or the paper's formula")
    s.add_argument("--compare", choices=(">", ">="), default=None, help="mask test (default: > lite, >= bau)")
    s.add_argument("--attack", choices=("none", "fgsm"), default="none",
                   help="also dissect untargeted FGSM images of the concept set (on the model's prediction)")
    s.add_argument("--eps", type=float, default=0.0112, help="FGSM budget in [0, 1] pixels (default 0.0112)")
    s.add_argument("--reuse-thresholds", action="store_true",
                   help="adversarial images use the clean thresholds instead of recomputing them")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", required=True, help="output folder (resumable; per layer and condition)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_dissect)


def cmd_concepts(args):
    import numpy as np

    from jaxroute.dissection.concepts import build_concepts, group_cap, iou_caps, load_color_table

    check_new_output(args.out, args.overwrite)
    table = Path(args.color_table) if args.color_table else DEFAULT_COLOR_TABLE
    if not 0 < args.quantile < 1:
        raise ValueError(f"--quantile must be in (0, 1), got {args.quantile}")
    # the cheap inputs are checked before the images are decoded
    load_color_table(table)
    if args.textures_per_name is not None and args.textures_per_name < 0:
        raise ValueError(f"--textures-per-name must be >= 0, got {args.textures_per_name}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    from jaxroute.cli.common import dataset_from_args

    pre = None
    if args.resize is not None or args.crop is not None:  # without them images keep their (uniform) size
        from jaxroute.data.preprocess import Preprocess

        side = args.crop if args.crop is not None else args.resize
        pre = Preprocess(args.resize if args.resize is not None else side, side, 3)
    ds = dataset_from_args(args, preprocess=pre)
    if ds.images.shape[-1] != 3:
        raise ValueError(f"the concept set needs RGB images, data {ds.name!r} has {ds.images.shape[-1]} channel(s)")
    images = np.asarray(np.rint(np.asarray(ds.images) * 255), np.uint8)
    log(f"writing the concept set of {len(images)} {ds.name} images to {args.out}")
    broden = build_concepts(args.out, images, ds.labels, ds.class_names, table,
                            textures_per_name=args.textures_per_name, seed=args.seed, split=args.split)
    caps = iou_caps(broden, args.quantile)
    # a WordNet group of classes as one image-level label covers the sum of its classes' fractions
    vehicle = [c for c in caps if c["label"] in VEHICLE]
    groups = []
    if len(vehicle) == len(VEHICLE):
        f = sum(c["fraction"] for c in vehicle)
        groups.append({"label": "vehicle (" + ", ".join(VEHICLE) + ")", "fraction": f, "cap": group_cap(f, args.quantile)})
    res = {"out": str(args.out), "images": len(broden), "labels": len(broden.labels),
           "categories": list(broden.categories), "iou_caps": caps, "group_caps": groups}
    lines = [f"wrote {len(broden)} concept images, {len(broden.labels)} labels, categories "
             f"{', '.join(broden.categories)} to {args.out}",
             f"IoU caps of the image-level labels (q / f at q = {args.quantile:g}; a detector needs IoU > 0.04):"]
    lines += [f"  {c['label']:14s} f = {c['fraction']:.4f}  cap = {c['cap']:.4f}" + ("  (below 0.04)" if c["cap"] <= 0.04
                                                                                    else "") for c in caps + groups]
    return res, "\n".join(lines)


def cmd_dissect(args):
    from jaxroute.dissection import DissectConfig, dissect_to_dir, read_broden
    from jaxroute.utils.io import check_writable_dir

    config = DissectConfig(quantile=args.quantile, iou_threshold=args.iou_threshold, rules=args.rules,
                           compare=args.compare, batch_size=args.batch_size)
    if args.attack != "none" and not 0 < args.eps <= 1:  # before the clean pass, not after it
        raise ValueError(f"--eps must be in (0, 1] pixels, got {args.eps}")
    if args.reuse_thresholds and args.attack == "none":
        raise ValueError("--reuse-thresholds applies to --attack fgsm only")
    broden = read_broden(args.concepts)
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    desc = {"arch": model.name, "weights": str(Path(args.weights).resolve()) if args.weights else None,
            "gate_placement": model.gate_placement}
    res = {}
    clean = dissect_to_dir(model, broden, args.layer, out, model_desc=desc, config=config, log=log)
    for layer, s in clean.items():
        res[layer] = dict(s)
    if args.attack != "none":
        adv = dissect_to_dir(model, broden, args.layer, out, model_desc=desc, config=config, attack=args.attack,
                             eps=args.eps, reuse_thresholds=args.reuse_thresholds, log=log)
        for layer, s in adv.items():
            res[layer].update({f"{k}_adv": v for k, v in s.items()})
    lines = []
    for layer, r in res.items():
        line = f"{layer}: {r['detectors']}/{r['units']} detector units ({r['detector_ratio']:.3f}), " \
               f"{r['unique_concepts']} concepts, by category {r['by_category']}"
        if "detector_ratio_adv" in r:
            line += f"; {args.attack} eps {args.eps:g}: {r['detectors_adv']}/{r['units_adv']} " \
                    f"({r['detector_ratio_adv']:.3f}), by category {r['by_category_adv']}"
        lines.append(line)
    return {"layers": res, "out": str(out), "attack": args.attack, "eps": args.eps if args.attack != "none" else None,
            "reuse_thresholds": args.reuse_thresholds}, "\n".join(lines)
