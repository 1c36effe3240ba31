"""The ``jaxroute`` command line.

Every subcommand prints progress to stderr; with ``--json`` the last line
of stdout is one JSON object with the results.  Errors in user input end
with a one-line message and exit status 2 (``JAXROUTE_DEBUG=1`` shows the
traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Keep XLA from grabbing all memory of a GPU the user shares with other jobs.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from jaxroute.cli.common import (add_data_args, add_model_args, check_new_output, data_for, emit, log,
                                  model_from_args)


def _cpu_devices_per_core() -> None:
    """On CPU, one JAX device per core (see :mod:`jaxroute.utils.devices`).

    The route job splits each batch over all local devices; on a 2-core CPU
    this routes ResNet-20 faster than one device over both cores
    (``benchmarks/README.md``).  How a batch is split
    does not change a sample's gates; with at most one core per device the
    16-channel convs are also computed over column pairs (faster, other float
    rounding; :mod:`jaxroute.utils.conv_grads`).  No effect on GPU/TPU devices.
    JAXROUTE_CPU_DEVICES=N sets the count; an explicit
    --xla_force_host_platform_device_count in XLA_FLAGS wins.
    """
    from jaxroute.utils.devices import cpu_devices_per_core

    try:
        cpu_devices_per_core()
    except RuntimeError:
        pass  # main() called in a process where JAX already runs: keep its devices


def _check_distributed_args(args) -> None:
    """The multi-process options, checked before any work (also when --coordinator is absent, where
    they would otherwise be ignored)."""
    if args.init_timeout < 1:
        raise ValueError(f"--init-timeout must be >= 1 second, got {args.init_timeout}")
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.coordinator is None:
        if args.num_processes is not None or args.process_id is not None:
            raise ValueError("--num-processes and --process-id apply to a --coordinator job")
        return
    from jaxroute.utils.rendezvous import split_address

    try:
        split_address(args.coordinator)
    except ValueError:
        raise ValueError(f"--coordinator must be host:port, got {args.coordinator!r}") from None
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")


def _init_distributed(args) -> None:
    """Join a jax.distributed job with a bounded wait and a one-line error if a process never comes."""
    import jax

    from jaxroute.utils import rendezvous

    _check_distributed_args(args)
    log(f"joining {args.num_processes} processes at {args.coordinator} as process {args.process_id} "
         f"(waiting up to {args.init_timeout} s)")
    # The runtime aborts the process (a C++ stack trace, no exception) when a process of the job
    # never comes: meet the others over a plain socket first, so that ends with one line.
    if args.process_id == 0:
        rendezvous.gather(args.coordinator, args.num_processes, args.init_timeout, log=log)
    else:
        rendezvous.join(args.coordinator, args.process_id, args.num_processes, args.init_timeout, log=log)
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.init_timeout)
    except Exception as e:  # the runtime raises various types (XlaRuntimeError, RuntimeError)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not join the distributed job at {args.coordinator} within "
                         f"{args.init_timeout} s: {first}") from None


# --------------------------------------------------------------------------- info
def cmd_info(args) -> dict:
    from jaxroute.models import create_model, gate_spec, list_models, model_card

    if args.model is None:
        rows = []
        for name in list_models():
            c = model_card(name)
            rows.append({"name": name, "input_shape": c.input_shape, "num_classes": c.num_classes,
                         "description": c.description})
        human = "\n".join(f"{r['name']:16s} {str(tuple(r['input_shape'])):16s} {r['num_classes']:5d}  "
                          f"{r['description']}" for r in rows)
        return {"models": rows}, human
    card = model_card(args.model)
    module = create_model(args.model, **({"gate_placement": args.gate_placement} if args.gate_placement else {}))
    spec = gate_spec(module, card.input_shape)
    res = {"name": card.name, "input_shape": list(card.input_shape), "num_classes": card.num_classes,
           "mean": list(card.mean), "std": list(card.std), "gate_placement": module.gate_placement,
           "gate_points": len(spec), "cdrp_size": spec.size, "layout": spec.layout()}
    human = (f"{card.name}: {card.description}\ninput {card.input_shape}, {card.num_classes} classes, "
             f"normalization mean={card.mean} std={card.std}\n{len(spec)} gate points "
             f"({module.gate_placement}), CDRP size {spec.size}:\n"
             + "\n".join(f"  {l['offset']:6d}  {l['name']:24s} {l['channels']}" for l in spec.layout()))
    return res, human


# --------------------------------------------------------------------------- eval
def cmd_eval(args) -> dict:
    from jaxroute.training import eval_logits, topk_accuracy

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = model_from_args(args, need_weights=True)
    ds = data_for(model, args)
    t = time.perf_counter()
    logits = eval_logits(model, ds, args.batch_size)
    res = {"model": model.name, "data": args.data, "split": args.split, "n": int(len(ds.labels)),
           **topk_accuracy(logits, ds.labels), "seconds": time.perf_counter() - t}
    human = f"{res['model']} on {args.data}/{args.split}: n={res['n']} top1={res['top1']:.4f} top5={res['top5']:.4f}"
    return res, human


# --------------------------------------------------------------------------- train
def cmd_train(args) -> dict:
    import dataclasses

    from jaxroute.training import TrainConfig, eval_logits, fit, topk_accuracy
    from jaxroute.weights import save_model

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      flip=args.augment, pad_crop=4 if args.augment else 0)
    check_new_output(args.out, args.overwrite)
    model = model_from_args(args)
    train = data_for(model, args)  # --split (default train)
    t = time.perf_counter()
    model = model.with_variables(fit(model, train, cfg, progress=not args.no_progress, log=log))
    seconds = time.perf_counter() - t
    test = data_for(model, args, split="test")
    acc = topk_accuracy(eval_logits(model, test), test.labels)
    meta = dataclasses.replace(model.meta, class_names=tuple(train.class_names),
                               source=f"jaxroute train --data {args.data} ({cfg})")
    path = save_model(args.out, model.variables, meta, overwrite=args.overwrite)
    res = {"model": model.name, "out": str(path), "train_seconds": seconds, "n_train": int(len(train.labels)),
           "n": int(len(test.labels)), **acc}
    human = (f"trained {res['model']} in {seconds:.1f}s; test top1={acc['top1']:.4f} top5={acc['top5']:.4f}; "
             f"saved to {path}")
    return res, human


# --------------------------------------------------------------------------- convert
def cmd_convert(args) -> dict:
    from jaxroute.weights import save_model

    if not args.weights:
        raise ValueError("convert needs --weights (a PyTorch file)")
    check_new_output(args.out, args.overwrite)
    model = model_from_args(args)
    path = save_model(args.out, model.variables, model.meta, overwrite=args.overwrite)
    res = {"model": model.name, "out": str(path)}
    return res, f"converted {args.weights} -> {path}"


# --------------------------------------------------------------------------- route
# CLI option -> (field of the router's config, the routers that take it); other routers refuse it
ROUTE_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "steps": ("steps", ("dgr",)), "lr": ("lr", ("dgr",)), "momentum": ("momentum", ("dgr",)),
    "gamma": ("gamma", ("dgr",)), "clip_min": ("clip_min", ("dgr",)), "clip_max": ("clip_max", ("dgr",)),
    "prune_frac": ("frac", ("awr", "aar")),
}


def _route_config(args):
    """The config of the chosen router (``jaxroute.routing.ROUTERS``) from the CLI options
    (validated by the config dataclass); an option of another router is refused."""
    from jaxroute.routing import ROUTERS

    given = {d: getattr(args, d) for d in ROUTE_OPTIONS if getattr(args, d) is not None}
    wrong: dict[tuple[str, ...], list[str]] = {}
    for d in given:
        if args.method not in ROUTE_OPTIONS[d][1]:
            wrong.setdefault(ROUTE_OPTIONS[d][1], []).append("--" + d.replace("_", "-"))
    if wrong:  # silently ignoring them would record a job that is not the one asked for
        methods, opts = next(iter(wrong.items()))
        verb = "applies" if len(opts) == 1 else "apply"
        raise ValueError(f"{', '.join(opts)} {verb} to {' and '.join(methods)}, not {args.method}")
    return ROUTERS[args.method][1](**{ROUTE_OPTIONS[d][0]: v for d, v in given.items()})


def cmd_route(args) -> dict:
    import jax

    from jaxroute.extraction import batch_size_for_memory, parse_bytes, plan_batches
    from jaxroute.routing import route_dataset, route_outputs
    from jaxroute.utils.io import check_writable_dir

    config = _route_config(args)  # bad arguments fail before anything is loaded or written
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    for name in ("batch_size", "shard_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    _check_distributed_args(args)
    check_writable_dir(args.out)
    if args.coordinator is not None:
        _init_distributed(args)
    model = model_from_args(args, need_weights=True)
    batch_size = args.batch_size or (32 if jax.default_backend() == "cpu" else 256)
    if budget is not None:
        batch_size = batch_size_for_memory(route_outputs(model, args.method, config), model.input_shape, budget)
        log(f"memory budget {budget / 2**20:.0f} MiB per device -> batch size {batch_size}")
    ds = data_for(model, args, stream=True)  # an ImageFolder is read batch by batch from its decoded cache
    plan = plan_batches(len(ds.images), batch_size, args.shard_size)
    if plan.batch_size < batch_size:
        log(f"{len(ds.images)} images on {plan.devices} device(s): batch size {plan.batch_size} per device")
    source = {"weights": str(args.weights or ""), "data": args.data, "split": args.split, "limit": args.limit}
    summary = route_dataset(model, ds, args.out, plan=plan, method=args.method, config=config, source=source,
                            progress=not args.no_progress, log=log)
    keys = ("n", "method", "top1_agreement", "top1_accuracy", "top5_accuracy", "full_top1", "full_top5",
            "sparsity", "sparsity_std", "fallback_fraction", "images_per_s", "seconds")
    res = {k: summary.get(k) for k in keys}
    res["out"] = str(args.out)
    ips = res["images_per_s"]
    human = (f"{args.method} on {res['n']} images: top1 agreement {res['top1_agreement']:.4f}, "
             f"top5 {res['top5_accuracy']:.4f}, sparsity {res['sparsity']:.4f}±{res['sparsity_std']:.4f}, "
             f"fallback {res['fallback_fraction']:.4f}"
             + (f", {ips:.1f} images/s" if ips else "") + f"; shards in {args.out}")
    return res, human


# --------------------------------------------------------------------------- quickstart
def cmd_quickstart(args) -> dict:
    """The embedded default job: train the digits CNN (once), then route the digits test set."""
    from jaxroute.training import TrainConfig
    from jaxroute.utils.io import check_writable_dir

    TrainConfig(epochs=args.epochs)  # checked even when a trained model is reused (it is not trained again)
    out = check_writable_dir(args.out)
    ckpt = out / "digits_cnn"
    common = ["--data", "digits", "--no-progress"] if args.no_progress else ["--data", "digits"]
    if not (ckpt / "jaxroute.json").exists():
        log(f"[1/2] training digits_cnn on scikit-learn's 8x8 digits -> {ckpt}")
        targs = build_parser().parse_args(["train", "--model", "digits_cnn", "--out", str(ckpt),
                                           "--overwrite", "--epochs", str(args.epochs), *common])
        tres, human = cmd_train(targs)
        log(human)
    else:
        log(f"[1/2] using the trained digits_cnn in {ckpt}")
    log(f"[2/2] routing the digits test set with DGR -> {out / 'routes'}")
    rargs = build_parser().parse_args(["route", "--model", "digits_cnn", "--weights", str(ckpt), "--split", "test",
                                       "--out", str(out / "routes"), "--batch-size", "120",
                                       "--shard-size", "120", *common])
    res, human = cmd_route(rargs)
    return res, human


# --------------------------------------------------------------------------- attack
ATTACK_METHODS = {  # CLI name -> (library attack, config fields from the CLI)
    "fgsm": ("fgsm", lambda a: {"eps": a.eps}),
    "ifgsm": ("bim", lambda a: {"eps": a.eps, "steps": a.steps}),
    "pgd_linf": ("pgd", lambda a: {"eps": a.eps, "steps": a.steps, "alpha": a.alpha, "norm": "linf"}),
    "pgd_l2": ("pgd", lambda a: {"eps": a.eps, "steps": a.steps, "alpha": a.alpha, "norm": "l2"}),
    "deepfool": ("deepfool", lambda a: {"max_iter": a.steps}),
    "cw_l2": ("cw", lambda a: {"steps": a.steps}),
    "ensemble": ("ensemble", lambda a: {"steps": a.steps, "lam": a.lam, "k": a.k}),
}
ATTACK_EPS = ("fgsm", "ifgsm", "pgd_linf", "pgd_l2")  # the methods with a perturbation budget
PGD_L2_EPS = 0.5  # CLI default L2 radius of pgd_l2 (the library default 8/255 is an L-inf budget)


def _attack_config(args) -> dict:
    """Config fields of the chosen method from the CLI options, checked before any work."""
    m = args.method
    if args.eps is not None:
        if m not in ATTACK_EPS:
            raise ValueError(f"--eps applies to {', '.join(ATTACK_EPS)}; {m} is a minimal-perturbation "
                             "attack without a budget (drop --eps)")
        if not 0 < args.eps <= 1:
            raise ValueError(f"--eps is in [0, 1] pixel units, got {args.eps}")
    if args.steps is not None:
        if m == "fgsm":
            raise ValueError("fgsm is a single step; --steps applies to the iterative methods")
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.alpha is not None:
        if not m.startswith("pgd"):
            raise ValueError(f"--alpha (the PGD step size) applies to pgd_linf and pgd_l2, not {m}")
        if not args.alpha > 0:
            raise ValueError(f"--alpha must be > 0 (pixel units), got {args.alpha}")
    if args.lam is not None:
        if m != "ensemble":
            raise ValueError(f"--lam (the distance weight of the ensemble attack) does not apply to {m}")
        if not args.lam >= 0:
            raise ValueError(f"--lam must be >= 0, got {args.lam}")
    if (args.k is not None or args.ensemble) and m != "ensemble":
        raise ValueError(f"--k and --ensemble apply to the ensemble attack, not {m}")
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.target != "none" and m == "deepfool":
        raise ValueError("deepfool is untargeted: use --target none")
    kw = {k: v for k, v in ATTACK_METHODS[m][1](args).items() if v is not None}
    if m.startswith("pgd"):
        from jaxroute.attacks import PGDConfig

        d = PGDConfig()
        if m == "pgd_l2" and args.eps is None:
            kw["eps"] = PGD_L2_EPS
        if args.alpha is None and ("eps" in kw or "steps" in kw):
            # Madry et al.'s rule alpha = 2.5 eps / steps (gives the library's 2/255 at 8/255, 10 steps)
            kw["alpha"] = 2.5 * kw.get("eps", d.eps) / kw.get("steps", d.steps)
    return kw


def cmd_attack(args) -> dict:
    """Attack a data set and save the adversarial images as a routable SPLIT.npz."""
    import jax
    import numpy as np

    from jaxroute.attacks import ATTACKS, attack_dataset
    from jaxroute.data import save_arrays_split
    from jaxroute.utils.io import check_writable_dir

    name = ATTACK_METHODS[args.method][0]
    kw = _attack_config(args)
    config = ATTACKS[name][1](**kw)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    ds = data_for(model, args)
    if ds.labels is None:
        raise ValueError(f"data {ds.name!r} has no labels; the attacks need the true labels")
    f = model.logits
    if name == "ensemble":  # the model attacked plus each --ensemble NAME:WEIGHTS member
        from jaxroute.weights import load_model

        members = [spec.split(":", 1) for spec in args.ensemble]
        if any(len(m) != 2 or not all(m) for m in members):
            raise ValueError(f"--ensemble takes NAME:WEIGHTS, got {args.ensemble}")
        f = (model.logits, *(load_model(n, w).logits for n, w in members))
    arrays = attack_dataset(f, ds.images, ds.labels, attack=name, config=config, targets=args.target,
                            key=jax.random.key(args.seed), batch_size=args.batch_size)
    images, labels = arrays.pop("images"), arrays.pop("labels")
    path = save_arrays_split(out, args.split, images, labels, ds.class_names, **arrays)
    arrays["labels"] = labels
    targeted = name == "ensemble" or args.target != "none"
    res = {"n": int(len(arrays["labels"])), "method": args.method,
           "target": ("least_likely" if name == "ensemble" and args.target == "none" else args.target),
           "seed": args.seed, "config": kw,
           "success_rate": float(arrays["success"].mean()), "mean_linf": float(arrays["linf"].mean()),
           "mean_l2": float(arrays["l2"].mean()),
           "clean_top1": float(np.mean(arrays["clean_pred"] == arrays["labels"])),
           "adv_top1": float(np.mean(arrays["adv_pred"] == arrays["labels"])), "out": str(out)}
    from jaxroute.data import Dataset
    from jaxroute.training import eval_logits, topk_accuracy

    res["adv_top5"] = topk_accuracy(eval_logits(model, Dataset(images, labels, ds.class_names, "adv")), labels)["top5"]
    what = "hit the target" if targeted else "changed the label"
    human = (f"{args.method} on {res['n']} images: success ({what}) {res['success_rate']:.4f}, mean Linf "
             f"{res['mean_linf']:.4f}, mean L2 {res['mean_l2']:.4f}, top-1 {res['clean_top1']:.4f} -> "
             f"{res['adv_top1']:.4f}; saved {path}")
    return res, human


# --------------------------------------------------------------------------- detect
def cmd_detect(args) -> dict:
    """Train and evaluate real-vs-adversarial detectors from saved extraction outputs."""
    from jaxroute.detection import CLASSIFIERS, evaluate_outputs

    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers, got {args.sizes!r}") from None
    classifiers = tuple(args.classifiers.split(","))
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if unknown or min(sizes) < 1 or args.runs < 1:
        raise ValueError(f"need classifiers out of {sorted(CLASSIFIERS)}, sizes >= 1 and --runs >= 1 "
                         f"(got {args.classifiers!r}, {args.sizes!r}, {args.runs})")
    rows = evaluate_outputs(args.train_real, args.train_adv, args.test_real, args.test_adv, feature=args.feature,
                            sizes=sizes, runs=args.runs, classifiers=classifiers, seed=args.seed)
    res = {"feature": args.feature, "rows": rows}
    for r in rows:  # headline: the largest training size
        if r["per_class"] == max(sizes):
            res[r["classifier"]] = {"auc_mean": r["auc_mean"], "auc_std": r["auc_std"]}
    human = "\n".join(f"{r['classifier']:18s} {r['per_class']:4d}/class  AUC {r['auc_mean']:.4f} ± {r['auc_std']:.4f}"
                      for r in rows)
    return res, human


ROUTER_NAMES = ("dgr", "awr", "aar", "controller")  # jaxroute.routing.ROUTERS, named here so the parser imports no JAX


def _defaults(config: str) -> dict:
    """Field defaults of a router config class, for the help texts (one source of truth)."""
    import dataclasses

    from jaxroute.routing import dgr, pruning

    cls = {"DGRConfig": dgr.DGRConfig, "PruneConfig": pruning.PruneConfig}[config]
    return {f.name: f.default for f in dataclasses.fields(cls)}


# Modules of jaxroute.cli with more subcommands; each has ``add_parsers(sub)`` (see jaxroute.cli.common).
SUBCOMMAND_MODULES: tuple[str, ...] = ("dissection", "subnets", "data", "explain", "decouple", "probe", "detectors",
                                        "localize")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxroute", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="list models, or show one model's gate layout")
    s.add_argument("--model")
    s.add_argument("--gate-placement", choices=("post_act", "conv", "block"), default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="top-1/top-5 accuracy of a model on a data set")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("train", help="train or fine-tune a model, save an orbax checkpoint")
    add_model_args(s)
    add_data_args(s, split="train")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--augment", action="store_true", help="random flips and 4-pixel pad-crops")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("convert", help="convert PyTorch weights into a jaxroute checkpoint (needs torch)")
    add_model_args(s)
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("route", help="extract routing paths (CDRPs) of a data set into resumable shards")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--out", required=True)
    s.add_argument("--method", choices=sorted(ROUTER_NAMES), default="dgr",
                   help="dgr, awr, aar: route the model's gates (on a decoupled checkpoint: its backbone at the "
                        "controlled convs, every filter on as the full model); controller: the calculation "
                        "paths z = 1(G > 0) of a decoupled checkpoint (jaxroute decouple), no options")
    d = _defaults("DGRConfig")
    s.add_argument("--steps", type=int, default=None, help=f"DGR: SGD steps T (default {d['steps']})")
    s.add_argument("--lr", type=float, default=None, help=f"DGR: learning rate (default {d['lr']})")
    s.add_argument("--momentum", type=float, default=None, help=f"DGR: momentum (default {d['momentum']})")
    s.add_argument("--gamma", type=float, default=None, help=f"DGR: L1 weight (default {d['gamma']})")
    s.add_argument("--clip-min", type=float, default=None, help=f"DGR: lower gate bound (default {d['clip_min']})")
    s.add_argument("--clip-max", type=float, default=None, help=f"DGR: upper gate bound (default {d['clip_max']})")
    s.add_argument("--prune-frac", type=float, default=None,
                   help=f"AWR/AAR: fraction pruned per iteration (default {_defaults('PruneConfig')['frac']})")
    s.add_argument("--batch-size", type=int, default=None,
                   help="images routed at once per device (bounds memory); default 32 on a CPU, where one "
                        "device per core routes fastest at small batches (benchmarks/README.md), 256 on a "
                        "GPU/TPU")
    s.add_argument("--shard-size", type=int, default=1024, help="images per output shard (multiple of batch)")
    s.add_argument("--memory-budget", help="e.g. 2GB: choose the per-device batch size to fit this much memory "
                                           "(overrides --batch-size; shard size is rounded up to a multiple)")
    s.add_argument("--coordinator", help="jax.distributed coordinator address host:port (multi-host)")
    s.add_argument("--num-processes", type=int, default=None)
    s.add_argument("--process-id", type=int, default=None)
    s.add_argument("--init-timeout", type=int, default=60,
                   help="seconds to wait for the other processes of a --coordinator job (default 60)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_route)

    s = sub.add_parser("attack", help="adversarial images of a data set, saved as a routable SPLIT.npz")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--method", choices=sorted(ATTACK_METHODS), required=True)
    s.add_argument("--eps", type=float, default=None,
                   help="budget in [0, 1] pixel units for fgsm, ifgsm, pgd_linf, pgd_l2 (defaults: 8/255; "
                        "ifgsm 0.01; pgd_l2 0.5 in L2); for ifgsm the per-step size, as in the DGR paper "
                        "(Eq. 5/6: step eps, T steps, clipped to [0, 1])")
    s.add_argument("--steps", type=int, default=None,
                   help="iterations (ifgsm, pgd: steps; deepfool: max iterations; cw_l2: Adam steps per "
                        "binary-search round; ensemble: Adam steps); attack default if omitted")
    s.add_argument("--alpha", type=float, default=None,
                   help="PGD step size in pixel units (default 2.5 * eps / steps, Madry et al.)")
    s.add_argument("--lam", type=float, default=None,
                   help="ensemble: weight of the L2 distance on [0, 1] pixels (library default 0.1*255, "
                        "unverified against the paper; small inputs such as 8x8 digits need less, e.g. 1)")
    s.add_argument("--ensemble", action="append", default=[], metavar="NAME:WEIGHTS",
                   help="ensemble: one more member model (repeatable); the attacked --model is always one")
    s.add_argument("--k", type=int, default=None, help="ensemble: targets per image, least likely first (default 1)")
    s.add_argument("--target", choices=("none", "random", "least_likely"), default="none",
                   help="none: untargeted, away from the true label; random: a uniformly random class other "
                        "than the true one (drawn from --seed); least_likely: the model's least likely class "
                        "other than the true one. The ensemble attack is always targeted: none and "
                        "least_likely give its least-likely targets, random gives random ones")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--seed", type=int, default=0,
                   help="PRNG seed of the random targets and the PGD random start (recorded in the JSON)")
    s.add_argument("--out", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_attack)

    s = sub.add_parser("detect", help="adversarial detection AUC from saved extraction outputs (route --out dirs)")
    for k in ("train-real", "train-adv", "test-real", "test-adv"):
        s.add_argument(f"--{k}", required=True, help=f"route output dir of the {k.replace('-', ' ')} images")
    s.add_argument("--feature", default="cdrp", help="cdrp (routing paths) or features (penultimate activations)")
    s.add_argument("--sizes", default="10,50,100", help="training images per class (each with its adversarial twin)")
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--classifiers", default="random_forest,adaboost,gradient_boosting")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_detect)

    s = sub.add_parser("quickstart", help="the embedded default job: train the digits CNN, route its test set")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--epochs", type=int, default=20)
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_quickstart)

    import importlib

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"jaxroute.cli.{name}").add_parsers(sub)
    return p


def main(argv=None) -> int:
    _cpu_devices_per_core()
    args = build_parser().parse_args(argv)
    try:
        res, human = args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, KeyError) as e:
        if os.environ.get("JAXROUTE_DEBUG"):
            raise
        msg = str(e).strip() or type(e).__name__
        print(f"jaxroute {args.command}: error: {msg}", file=sys.stderr)
        return 2
    emit(res, getattr(args, "json", False), human)
    return 0


if __name__ == "__main__":
    sys.exit(main())
