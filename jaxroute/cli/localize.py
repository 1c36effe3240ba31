"""``jaxroute localize``: weakly supervised localization error of saliency methods on paste-set canvases,
full weights vs class subnetworks (:mod:`jaxroute.explain.localize`)."""
from __future__ import annotations

import time

from jaxroute.cli.common import add_data_args, add_model_args, data_for, log, model_from_args
from jaxroute.cli.explain import METHOD_NAMES, _configs, _methods, add_config_args


def cmd_localize(args):
    import jax

    from jaxroute.explain import class_gates
    from jaxroute.explain.localize import localize

    methods = _methods(args.methods, "--methods")  # bad arguments fail before anything is loaded
    configs = {m: c for m, c in _configs(args).items() if m in methods}  # options of methods not run: unused
    for name in ("n_train", "n_test", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if not args.train_split:
        raise ValueError("--train-split must name a split of the data (e.g. train)")
    model = model_from_args(args, need_weights=True)
    subnets = class_gates(args.subnets, model) if args.subnets else None
    train = data_for(model, args, split=args.train_split).materialize()
    test = data_for(model, args).materialize()
    for ds, split in ((train, args.train_split), (test, args.split)):
        if ds.labels is None:
            raise ValueError(f"split {split!r} of {args.data!r} has no labels; the paste set needs each image's class")
    batch_size = args.batch_size or (8 if jax.default_backend() == "cpu" else 64)
    t = time.perf_counter()
    res = localize(model, train.images, train.labels, test.images, test.labels, methods=methods, subnets=subnets,
                   n_train=args.n_train, n_test=args.n_test, key=jax.random.key(args.seed), batch_size=batch_size,
                   configs=configs, log=log)
    seconds = time.perf_counter() - t
    out = {**res, "n_train": args.n_train, "n_test": args.n_test, "seconds": seconds}
    rows = [f"{'method':>22s} {'err full':>9s} {'err subnet':>10s} {'alpha* full/subnet':>19s} "
            f"{'energy full/subnet':>19s}"]
    for m, r in res.items():
        f, s = r["full"], r.get("subnet")
        rows.append(f"{m:>22s} {f['err']:8.2f}% " + (f"{s['err']:9.2f}% " if s else f"{'-':>10s} ")
                    + f"{f['alpha_star']:>9g}/{s['alpha_star'] if s else '-':<9} "
                    + f"{f['energy_in_box']:>9.4f}/" + (f"{s['energy_in_box']:.4f}" if s else "-"))
    h, w = model.input_shape[:2]
    human = (f"localization error of {model.name} on {2 * h}x{2 * w} paste-set canvases (alpha* on {args.n_train} "
             f"{args.train_split} canvases, error on {args.n_test} {args.split} canvases, {seconds:.1f} s):\n"
             + "\n".join(rows))
    return out, human


def add_parsers(sub) -> None:
    s = sub.add_parser("localize", help="weakly supervised localization error of saliency methods on paste-set "
                                        "canvases, full weights vs class subnetworks")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--train-split", default="train",
                   help="split whose images make the canvases alpha* is tuned on (default train; --split, "
                        "default test, makes the canvases the error is measured on; --limit applies to both)")
    s.add_argument("--methods", required=True, help=f"comma-separated, of: {', '.join(METHOD_NAMES)}")
    s.add_argument("--subnets", default=None,
                   help="directory with subnets.npz (from `jaxroute subnet`): also explain each canvas under "
                        "its pasted class's subnetwork")
    s.add_argument("--n-train", type=int, default=1000, help="training canvases alpha* is tuned on (default 1000)")
    s.add_argument("--n-test", type=int, default=2000, help="test canvases the error is measured on (default 2000)")
    add_config_args(s)
    s.add_argument("--seed", type=int, default=0,
                   help="PRNG seed of the canvases and SmoothGrad's noise (and random init without --weights)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="canvases per batch (default 8 on a CPU, 64 on a GPU/TPU; IG and SmoothGrad evaluate "
                        "50 copies of each)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_localize)
