"""``jaxroute subnet``: class-specific subnetworks of a model (:mod:`jaxroute.routing.subnet`)."""
from __future__ import annotations

import dataclasses
import time

from jaxroute.cli.common import add_data_args, add_model_args, data_for, log, model_from_args


def _config(args):
    """The SubnetConfig of the CLI options (validated by the dataclass: bad values fail before any work)."""
    from jaxroute.routing.subnet import SubnetConfig

    fields = {"gamma": args.gamma, "tau": args.tau, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "bce_reduction": args.bce_reduction}
    return SubnetConfig(**{k: v for k, v in fields.items() if v is not None})


def cmd_subnet(args):
    import numpy as np

    from jaxroute.routing.subnet import distill_to_dir, subnet_auc
    from jaxroute.utils.io import atomic_write_json, check_writable_dir

    config = _config(args)
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    train = data_for(model, args)
    test = data_for(model, args, split=args.test_split)
    if len(train.class_names) < 2:
        raise ValueError(f"data {train.name!r} has {len(train.class_names)} class; subnetworks need at least two")
    source = {"weights": str(args.weights or ""), "data": args.data, "split": args.split, "limit": args.limit}
    t = time.perf_counter()
    res = distill_to_dir(model, train, out, config=config, source=source, log=log)
    seconds = time.perf_counter() - t
    test = test.materialize()
    auc_full, auc_sub = subnet_auc(model, res.gates, test.images, test.labels, classes=res.classes)
    names = [str(c) for c in (train.class_names or range(model.num_classes))]
    result = {
        "num_classes": int(len(res.classes)),
        "sparsity_mean": float(np.mean(res.sparsity)),
        "sparsity_per_class": [float(s) for s in res.sparsity],
        "selected_epoch": [int(e) for e in res.selected_epoch],
        "fallback_classes": [int(c) for c, f in zip(res.classes, res.fallback) if f],
        "auc_full": [float(a) for a in auc_full],
        "auc_subnet": [float(a) for a in auc_sub],
        "auc_split": args.test_split,
        "config": dataclasses.asdict(config),
        "seconds": seconds,
        "out": str(out),
    }
    atomic_write_json(out / "summary.json", result)
    rows = [f"{'class':>14s} {'sparsity':>8s} {'epoch':>5s} {'AUC full':>8s} {'AUC sub':>8s}"]
    for k, c in enumerate(res.classes):
        flag = "  (fallback: no snapshot <= tau)" if res.fallback[k] else ""
        name = names[c] if c < len(names) else str(c)
        rows.append(f"{name:>14s} {res.sparsity[k]:8.4f} {int(res.selected_epoch[k]):5d} {auc_full[k]:8.4f} "
                    f"{auc_sub[k]:8.4f}{flag}")
    human = (f"{len(res.classes)} class subnetworks of {model.name} in {out} (sparsity = fraction of gates > 0, "
             f"mean {result['sparsity_mean']:.4f}; AUC of logit c on {args.test_split}):\n" + "\n".join(rows))
    return result, human


def add_parsers(sub) -> None:
    from jaxroute.routing.subnet import SubnetConfig

    d = {f.name: f.default for f in dataclasses.fields(SubnetConfig)}
    s = sub.add_parser("subnet", help="class-specific subnetworks (one gate vector per class), resumable per epoch")
    add_model_args(s)
    add_data_args(s, split="train")
    s.add_argument("--test-split", default="test", help="split for the one-vs-rest AUC of logit c, full vs subnet")
    s.add_argument("--out", required=True, help="output folder (subnets.npz, manifest.json; resumes there)")
    s.add_argument("--gamma", type=float, default=None, help=f"L1 weight (default {d['gamma']})")
    s.add_argument("--tau", type=float, default=None,
                   help=f"sparsity level: keep the lowest-loss snapshot with fraction of gates > 0 <= tau "
                        f"(default {d['tau']})")
    s.add_argument("--epochs", type=int, default=None, help=f"epochs over each class's balanced set "
                                                            f"(default {d['epochs']})")
    s.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d['lr']}; the paper: 0.1)")
    s.add_argument("--batch-size", type=int, default=None, help=f"images per class per step (default "
                                                                f"{d['batch_size']})")
    s.add_argument("--bce-reduction", choices=("mean", "sum"), default=None,
                   help=f"BCE over a batch: sum or mean (the paper: mean; default {d['bce_reduction']})")
    s.add_argument("--seed", type=int, default=d["seed"], help="PRNG seed of the balanced sets (and of a randomly "
                                                               "initialised model)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_subnet)
