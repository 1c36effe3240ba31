"""``jaxroute explain``: saliency maps of a data set, with full weights or each class's subnetwork."""
from __future__ import annotations

from jaxroute.cli.common import add_data_args, add_model_args, data_for, log, model_from_args

# jaxroute.explain.METHODS, named here so that building the parser imports no JAX
METHOD_NAMES = ("gradient", "deconvnet", "guided_backprop", "grad_cam", "integrated_gradients", "smoothgrad")


def _methods(text: str, flag: str = "--method") -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise ValueError(f"unknown saliency method(s) {', '.join(unknown) or repr(text)}; "
                         f"one or more of {', '.join(METHOD_NAMES)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"{flag} names a method twice: {text}")
    return methods


def _configs(args) -> dict:
    """Method configs from the options (validated by the dataclasses)."""
    from jaxroute.explain import IGConfig, SmoothGradConfig

    configs = {}
    if args.ig_steps is not None:
        configs["integrated_gradients"] = IGConfig(steps=args.ig_steps)
    sg = {k: v for k, v in (("samples", args.smoothgrad_samples), ("sigma", args.smoothgrad_sigma)) if v is not None}
    if sg:
        configs["smoothgrad"] = SmoothGradConfig(**sg)
    return configs


def add_config_args(s) -> None:
    """The options of the methods' configs (read by :func:`_configs`)."""
    s.add_argument("--ig-steps", type=int, default=None, help="integrated gradients: quadrature points (default 50)")
    s.add_argument("--smoothgrad-samples", type=int, default=None, help="SmoothGrad: noisy copies (default 50)")
    s.add_argument("--smoothgrad-sigma", type=float, default=None,
                   help="SmoothGrad: noise std as a fraction of the [0, 1] pixel range (default 0.15)")


def cmd_explain(args):
    import jax

    from jaxroute.explain import explain_dataset, class_gates
    from jaxroute.extraction import plan_batches
    from jaxroute.utils.io import check_writable_dir

    methods = _methods(args.method)  # bad arguments fail before anything is loaded or written
    configs = _configs(args)
    for name in ("batch_size", "shard_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    subnets = class_gates(args.subnets, model) if args.subnets else None
    ds = data_for(model, args, stream=True)
    batch_size = args.batch_size or (8 if jax.default_backend() == "cpu" else 64)
    plan = plan_batches(len(ds.images), batch_size, args.shard_size)
    source = {"weights": str(args.weights or ""), "data": args.data, "split": args.split, "limit": args.limit,
              "subnets": str(args.subnets or "")}
    res = explain_dataset(model, ds, args.out, plan=plan, methods=methods, configs=configs, subnets=subnets,
                          target=args.target, seed=args.seed, split=args.split, source=source,
                          progress=not args.no_progress, log=log)
    n = len(ds.images)
    out = {"n": n, "methods": methods, "maps_per_s": {m: r["maps_per_s"] for m, r in res.items()},
           "outputs": {m: r["npz"] for m, r in res.items()}, "subnets": bool(args.subnets), "target": args.target}
    rates = ", ".join(f"{m} {r['maps_per_s']:.1f}/s" if r["maps_per_s"] else f"{m} (done before)"
                      for m, r in res.items())
    human = (f"{n} images explained under {'class subnetworks' if subnets is not None else 'full weights'} "
             f"({args.target} targets): {rates}; maps in {args.out}/METHOD/{args.split}.npz")
    return out, human


def add_parsers(sub) -> None:
    s = sub.add_parser("explain", help="saliency maps of a data set (six methods), full weights or class subnetworks")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--method", required=True, help=f"comma-separated, of: {', '.join(METHOD_NAMES)}")
    s.add_argument("--subnets", default=None,
                   help="directory with subnets.npz (gates (classes, D)): explain each image under its target "
                        "class's subnetwork")
    s.add_argument("--target", choices=("label", "pred"), default="label",
                   help="the class explained: the true label (default) or the full model's prediction")
    s.add_argument("--out", required=True, help="output directory: OUT/METHOD/SPLIT.npz and resumable shards")
    add_config_args(s)
    s.add_argument("--seed", type=int, default=0, help="SmoothGrad's PRNG seed (and random init without --weights)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="images per device per batch (default 8 on a CPU, 64 on a GPU/TPU; IG and SmoothGrad "
                        "evaluate 50 copies of each)")
    s.add_argument("--shard-size", type=int, default=1024, help="images per output shard (multiple of batch)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_explain)
