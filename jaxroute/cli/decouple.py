"""``jaxroute decouple``: train per-layer architecture controllers on a pretrained model
(network decoupling, :mod:`jaxroute.decoupling`) and report accuracy, paths and MACs."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from jaxroute.cli.common import add_data_args, check_new_output, data_for_input, log


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.5,0.75, got {text!r}")


def add_parsers(sub) -> None:
    from jaxroute.decoupling.model import DECOUPLE_MODELS

    s = sub.add_parser("decouple", help="network decoupling: train architecture controllers, report paths/MACs")
    s.add_argument("--model", required=True, help=f"one of {', '.join(DECOUPLE_MODELS)}")
    s.add_argument("--weights", help="pretrained plain model (jaxroute checkpoint dir or PyTorch file)")
    add_data_args(s, split="train")
    s.add_argument("--test-split", default="test", help="split evaluated at the end")
    s.add_argument("--out", required=True, help="directory of the run: per-epoch state, then the decoupled model")
    s.add_argument("--epochs", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--joint-lr", type=float, default=None, help="lr after the frozen stage (default --lr)")
    s.add_argument("--milestones", type=_fractions, default=(0.5, 0.75),
                   help="fractions of the joint epochs where lr is divided by 10")
    s.add_argument("--weight-decay", type=float, default=1e-4)
    s.add_argument("--lambda-m", type=float, default=0.01, help="mutual-information loss weight")
    s.add_argument("--lambda-k", type=float, default=1.0, help="KL loss weight")
    s.add_argument("--lambda-s", type=float, default=0.00015, help="sparsity loss weight")
    s.add_argument("--target-ratio", type=float, default=0.0, help="R, target fraction of active filters")
    s.add_argument("--reduction", type=int, default=4, help="controller reduction γ")
    s.add_argument("--semhash", choices=("half", "official"), default="half")
    s.add_argument("--kl-direction", choices=("z_y", "y_z"), default="z_y")
    s.add_argument("--kl-reduction", choices=("mean", "batchmean", "sum"), default="mean")
    s.add_argument("--freeze-backbone-epochs", type=int, default=0)
    s.add_argument("--no-augment", action="store_true", help="no crop (pad 4) + flip")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_decouple)


def cmd_decouple(args):
    import jax

    from jaxroute.decoupling.model import check_decouple_model, decoupled_model, save_decoupled
    from jaxroute.models.gated import check_dataset_fits
    from jaxroute.models.registry import model_card
    from jaxroute.weights.checkpoint import META_FILE
    from jaxroute.decoupling.train import PROGRESS_FILE, DecoupleConfig, evaluate, train_decoupled

    check_decouple_model(args.model)
    config = DecoupleConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, joint_lr=args.joint_lr,
        milestones=tuple(args.milestones), weight_decay=args.weight_decay, lambda_m=args.lambda_m,
        lambda_k=args.lambda_k, lambda_s=args.lambda_s, target_ratio=args.target_ratio,
        kl_direction=args.kl_direction, kl_reduction=args.kl_reduction,
        freeze_backbone_epochs=args.freeze_backbone_epochs, flip=not args.no_augment,
        pad_crop=0 if args.no_augment else 4, seed=args.seed)
    out = Path(args.out)
    if out.exists():
        if args.overwrite:
            shutil.rmtree(out)
        elif (out / META_FILE).is_file() or not (out / PROGRESS_FILE).is_file():
            raise FileExistsError(f"{out} exists and is not an unfinished decoupling run "
                                  "(pass --overwrite to replace it)")
    else:
        check_new_output(out, False)
    # the data first: initialising the controllers compiles, and bad data arguments should fail at once
    shape = model_card(args.model).input_shape
    train = data_for_input(args.model, shape, args)
    test = data_for_input(args.model, shape, args, split=args.test_split)
    model = decoupled_model(args.model, args.weights, key=jax.random.key(args.seed),
                            reduction=args.reduction, semhash=args.semhash)
    check_dataset_fits(model, train)
    check_dataset_fits(model, test)
    variables, history = train_decoupled(model, train, out, config, log=log)
    model = model.with_variables(variables)
    res = evaluate(model, test)
    save_decoupled(out, model)  # OUT becomes a loadable checkpoint (its training state stays beside it)
    last = history[-1]
    res.update({"epochs_done": len(history), "loss_ce": last["ce"], "loss_mi": last["mi"],
                "loss_kl": last["kl"], "loss_sparse": last["sparse"],
                "seconds_per_epoch": float(sum(h["seconds"] for h in history) / len(history)),
                "model": str(out)})
    human = (f"decoupled {args.model}: top-1 {res['test_top1']:.4f}, active {res['active_fraction']:.3f}, "
             f"MACs {res['macs_mean'] / 1e6:.2f}M ({res['macs_reduction']:.2f}x fewer); model in {out}")
    return res, human
