"""``jaxroute data``: prepare data sets for repeated jobs.

``jaxroute data convert --data FOLDER --split S --model M --out DIR`` decodes
and preprocesses one split with the model card's transform (or ``--resize`` /
``--crop``) on grain's decode workers and writes it as ArrayRecord
(:mod:`jaxroute.data.records`); ``jaxroute route --data DIR --split S`` then
reads pixels instead of decoding images again.
"""
from __future__ import annotations

from jaxroute.cli.common import add_preprocess_args, check_new_output, dataset_from_args, log, preprocess_from_args


def cmd_data_convert(args):
    from pathlib import Path

    from jaxroute.data.records import is_records_split, write_records
    from jaxroute.models.registry import model_card

    card = model_card(args.model)
    out = Path(args.out)
    if is_records_split(out, args.split):
        raise FileExistsError(f"{out} already holds a converted split {args.split!r}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    check_new_output(out / f"{args.split}.array_record", overwrite=False)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    pre = preprocess_from_args(args.model, card.input_shape, args)
    ds = dataset_from_args(args, stream=True, preprocess=pre)
    if (ds.info or {}).get("preprocess") != pre.to_json():
        raise ValueError(f"{args.data!r} is not an image folder or tfds data set; only those are converted")
    skipped = (ds.info or {}).get("skipped", [])
    log(f"converting {len(ds)} images of {args.data} split {args.split} for {args.model}: shorter side "
        f"{pre.resize}, centre crop {pre.crop}" + (f"; {len(skipped)} bad files left out" if skipped else ""))
    source = {"data": args.data, "split": args.split, "limit": args.limit, "model": args.model}
    meta = write_records(ds, out, args.split, source=source, progress=not args.no_progress, log=log)
    res = {"out": str(out), "split": args.split, "num_records": meta["num_records"], "shape": meta["shape"],
           "preprocess": meta["preprocess"], "skipped": [s["file"] for s in skipped],
           "seconds": meta["seconds"], "images_per_s": meta["images_per_s"]}
    ips = meta["images_per_s"]
    human = (f"{meta['num_records']} images {tuple(meta['shape'])} -> {out} ({args.split}.array_record)"
             + (f", {ips:.1f} images/s" if ips else "")
             + (f"; left out {len(skipped)} bad files" if skipped else "")
             + f"; route it with --data {out} --split {args.split}")
    return res, human


def add_parsers(sub) -> None:
    p = sub.add_parser("data", help="prepare data sets (convert an image folder to preprocessed ArrayRecord)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("convert", help="decode + preprocess a split once and write it as ArrayRecord, so that "
                                        "`jaxroute route --data OUT` skips decoding")
    s.add_argument("--data", required=True, help="ImageFolder (split/class/*.jpg|png, any sizes) or tfds:NAME")
    s.add_argument("--split", default="test")
    s.add_argument("--model", required=True, help="architecture whose input pipeline to apply (see `jaxroute info`)")
    s.add_argument("--out", required=True, help="folder to write SPLIT.array_record (+ labels and description)")
    s.add_argument("--limit", type=int, default=None, help="convert the first N images (class-interleaved order)")
    s.add_argument("--data-dir", default=None, help="tfds data dir")
    s.add_argument("--download", action="store_true", help="allow tfds to download (off by default)")
    add_preprocess_args(s)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_convert)
