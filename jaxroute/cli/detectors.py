"""``jaxroute adv-detect``: feature-space adversarial detectors (Mahalanobis, LID, KD+PU, the
class-subnetwork Mahalanobis detector ``subnet`` of Wang, Hu, Su with ``--subnets DIR``, and ``cdrp``, the
DGR routing paths of Wang et al. as characteristics) and their protocol.

A thin layer over :func:`jaxroute.detection.job.run_detection`, which does the
work and documents the cache under ``--out`` (attacks, features,
characteristics, ``result.json``); a rerun resumes.
"""
from __future__ import annotations

from jaxroute.cli.common import add_data_args, add_model_args, data_for, log, model_from_args


def _names(text: str, allowed, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def cmd_adv_detect(args):
    import numpy as np

    from jaxroute.detection.density import KDPUConfig
    from jaxroute.detection.job import (
        ATTACK_NAMES, CDRP_CLASSIFIERS, DETECTORS, check_names, format_table, run_detection, subnet_gates,
    )
    from jaxroute.detection.lid import LIDConfig
    from jaxroute.detection.mahalanobis import MahalanobisConfig
    from jaxroute.routing.dgr import DGRConfig
    from jaxroute.utils.io import check_writable_dir

    attacks = _names(args.attacks, ATTACK_NAMES, "attack(s)")
    detectors = _names(args.detectors, DETECTORS, "detector(s)")
    if "subnet" in detectors and not args.subnets:
        raise ValueError("the subnet detector needs --subnets DIR (class subnetworks)")
    for name in ("runs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_limit is not None and args.train_limit < 1:
        raise ValueError(f"--train-limit must be >= 1, got {args.train_limit}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    # the detectors' settings are checked before any feature or attack is computed
    mcfg = (MahalanobisConfig(**({"epsilons": _floats(args.eps, "--eps")} if args.eps is not None else {}))
            if "mahalanobis" in detectors or "subnet" in detectors else None)
    lcfg = LIDConfig(drop_first=args.lid_rule,
                     **({"ks": _ints(args.lid_k, "--lid-k")} if args.lid_k is not None and "lid" in detectors else {}))
    kcfg = KDPUConfig(bandwidth=args.bandwidth, passes=args.pu_passes) if "kd_pu" in detectors else None
    # checked whether or not cdrp runs: a bad value is an error, not silently unused
    dcfg = DGRConfig(**{k: v for k, v in (("steps", args.dgr_steps), ("gamma", args.dgr_gamma)) if v is not None})
    check_names((args.cdrp_classifier,), CDRP_CLASSIFIERS, "cdrp classifier")
    subnets = None
    if "subnet" in detectors and args.subnets is not None:
        from jaxroute.routing.subnet import load_subnets

        subnets = load_subnets(args.subnets)   # a folder without subnets.npz ends here, before the model is built
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    # no --subnets, or another model's subnetworks, end here, before any data is loaded
    gates = subnet_gates(subnets, model) if "subnet" in detectors else None
    test = data_for(model, args)
    if test.labels is None:
        raise ValueError(f"data {test.name!r} has no labels; the protocol needs the true labels")
    train = data_for(model, args, split=args.train_split)
    if args.train_limit is not None:
        from jaxroute.data import Dataset

        train = Dataset(np.asarray(train.images[:args.train_limit]), np.asarray(train.labels[:args.train_limit]),
                        train.class_names, train.name)
    result = run_detection(
        model, test, train, out=out, attacks=attacks, detectors=detectors, mahalanobis=mcfg, lid=lcfg, kd_pu=kcfg,
        subnets=gates, dgr=dcfg if "cdrp" in detectors else None, cdrp_classifier=args.cdrp_classifier, runs=args.runs, batch_size=args.batch_size,
        seed=args.seed,
        job={"weights": str(args.weights or ""), "data": args.data},
        train_job={"split": args.train_split, "limit": args.train_limit},
        test_job={"split": args.split, "limit": args.limit}, log=log)
    return result, format_table(result, attacks, detectors)


def add_parsers(sub) -> None:
    from jaxroute.routing.dgr import DGRConfig

    dgr = DGRConfig()
    p = sub.add_parser("adv-detect", help="feature-space adversarial detectors (Mahalanobis, LID, KD+PU, "
                       "class-subnetwork Mahalanobis, DGR routing paths)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--train-split", default="train", help="split the class statistics are fitted on")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--attacks", default="fgsm,bim,deepfool,cw")
    p.add_argument("--detectors", default="kd_pu,lid,mahalanobis",
                   help="comma-separated: kd_pu, lid, mahalanobis, subnet (needs --subnets), cdrp (DGR routing "
                        "paths; T forward/backward passes per image, best on a GPU)")
    p.add_argument("--subnets", default=None, help="class subnetworks of this model (a `jaxroute subnet` output "
                   "folder) for the subnet detector")
    p.add_argument("--lid-rule", choices=("self", "all"), default="self",
                   help="LID neighbour rule: drop only a clean query's self-match (default), or the first "
                        "neighbour of every query as the reference code")
    p.add_argument("--eps", default=None, help="Mahalanobis (and subnet) pre-processing magnitudes, comma-separated "
                   "(default: the reference's seven, 0,0.01,0.005,0.002,0.0014,0.001,0.0005)")
    p.add_argument("--lid-k", default=None, help="LID neighbour counts, comma-separated (default 10,20,...,90)")
    p.add_argument("--bandwidth", type=float, default=0.26, help="KD bandwidth (0.26: Feinman et al., CIFAR-10)")
    p.add_argument("--pu-passes", type=int, default=50, help="stochastic passes of the predictive uncertainty")
    p.add_argument("--dgr-steps", type=int, default=None, help=f"cdrp: DGR steps T (default {dgr.steps}, the paper's)")
    p.add_argument("--dgr-gamma", type=float, default=None, help=f"cdrp: DGR L1 weight γ (default {dgr.gamma})")
    p.add_argument("--cdrp-classifier", default="logistic",
                   help="cdrp: the protocol's classifier, logistic (default: the regression of every row) or one "
                        "of the DGR paper's random_forest, adaboost, gradient_boosting")
    p.add_argument("--runs", type=int, default=1, help="reshuffles of the split; AUROC mean ± std")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="cache and result directory (resumable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adv_detect)
