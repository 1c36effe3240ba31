"""``jaxroute probe``, ``adv-train`` and ``trace``: adversarial images as an interpretability probe.

The three steps of Dong et al. (arXiv:1708.05493) on a saved model: neuron
consistency, feature ratios and Gaussian detection of a targeted adversarial
set (``probe``); fine-tuning with the feature-consistency loss (``adv-train``);
the neurons a prediction rests on (``trace``).  ``adv-train --objective xie``
is the same training step with Xie et al.'s objective (FGSM on the model's
predictions, CORAL and MMD behind an adaptation layer;
:mod:`jaxroute.training.adversarial`); both report clean, FGSM and PGD test
accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from jaxroute.cli.common import add_data_args, add_model_args, data_for, log, model_from_args


def _load_adv(path, model, limit=None) -> dict:
    from jaxroute.analysis.probe import check_adversarial_set

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adversarial set {path} not found (write it with jaxroute attack --out DIR)")
    try:
        with np.load(path, allow_pickle=False) as z:
            adv = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file of arrays: {e}") from None
    if "images" in adv and adv["images"].dtype == np.uint8:
        adv["images"] = adv["images"].astype(np.float32) / 255.0
    if limit is not None and "orig_index" in adv:  # keep the adversarials of the real images in use
        keep = adv["orig_index"] < limit
        adv = {k: (v[keep] if np.ndim(v) and len(v) == len(keep) else v) for k, v in adv.items()}
    return check_adversarial_set(adv, model)


def _class_correlation(args, class_names):
    from jaxroute.analysis.wordnet import correlation_matrix, wordnet_distances

    if class_names is None:
        raise ValueError("the data set has no class names to look up in WordNet")
    dist, _, _ = wordnet_distances(args.wordnet, tuple(class_names))
    return correlation_matrix(dist, args.sigma)


# --------------------------------------------------------------------------- probe
def _signed(v) -> str:
    return "undefined" if v is None else f"{v:+.3f}"


def cmd_probe(args):
    from jaxroute.analysis.probe import probe
    from jaxroute.utils.io import atomic_save_npz, atomic_write_text, check_writable_dir

    if not np.isfinite(args.sigma) or args.sigma <= 0:
        raise ValueError(f"--sigma must be > 0, got {args.sigma}")
    if not 0 < args.top_frac <= 1:
        raise ValueError(f"--top-frac must be in (0, 1], got {args.top_frac}")
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    if args.point is not None:
        model.spec.check_points(args.point)
    real = data_for(model, args)
    corr = _class_correlation(args, real.class_names)
    adv = _load_adv(args.adv, model, args.limit)
    train = None
    if args.train_split:
        train = data_for(model, argparse.Namespace(**{**vars(args), "limit": args.train_limit}),
                         split=args.train_split)
    t = time.perf_counter()
    summary, arrays = probe(model, real, adv, corr, train=train, point=args.point, top_frac=args.top_frac,
                            reduce=args.reduce, batch_size=args.batch_size)
    summary["seconds"] = time.perf_counter() - t
    summary["sigma"] = args.sigma
    atomic_save_npz(out / "probe.npz", **arrays)
    atomic_write_text(out / "probe.json", json.dumps(summary, indent=2, sort_keys=True))
    g = summary["gaussian_auc"]
    human = (f"{summary['n_real']} real / {summary['n_adv']} adversarial images, {summary['n_neurons']} neurons: "
             f"LC {summary['lc_mean']:.4f}, CS1 {summary['cs1_mean']:.4f}, CS2 {summary['cs2_mean']:.4f} "
             f"(ρ(LC,CS1) {_signed(summary['spearman_lc_cs1'])}, ρ(LC,CS2) {_signed(summary['spearman_lc_cs2'])}); "
             f"r1 {summary['r1_mean']:.4f}, r2 {summary['r2_mean']:.4f} (control {summary['r1_control_mean']:.4f}, "
             f"{summary['r2_control_mean']:.4f})" + (f"; Gaussian AUC {g:.4f}" if g is not None else "")
             + f"; saved {out / 'probe.json'}")
    return summary, human


# --------------------------------------------------------------------------- adv-train
def adv_train_config(args):
    """The :class:`AdvTrainConfig` of ``adv-train``'s arguments (unset weights: the objective's defaults)."""
    from jaxroute.training.adversarial import AdvTrainConfig

    return AdvTrainConfig(objective=args.objective, alpha=args.alpha, beta=args.beta, steps=args.steps,
                          step_eps=args.step_eps, target=args.target, eps=args.eps, lambda_coral=args.lambda_coral,
                          lambda_mmd=args.lambda_mmd, coral_norm=args.coral_norm, mmd=args.mmd,
                          adaptation=args.adaptation, feature=args.feature, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed)


def cmd_adv_train(args):
    import jax

    from jaxroute.training.adversarial import adversarial_fit, robust_accuracy
    from jaxroute.utils.io import atomic_save_npz, check_writable_dir
    from jaxroute.weights import save_model

    cfg = adv_train_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.exists() and not (out / "progress.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and holds no adversarial training run; choose another --out")
    check_writable_dir(out)
    model = model_from_args(args, need_weights=True)
    train = data_for(model, args)  # --split (default train)
    test = data_for(model, args, split="test")
    source = {"model": args.model, "weights": str(args.weights or ""), "data": args.data, "limit": args.limit}
    res = adversarial_fit(model, train, cfg, out, source=source, log=log)
    model = model.with_variables(res["variables"])
    acc = robust_accuracy(model, test, cfg.eps, key=jax.random.key(cfg.seed))
    meta = dataclasses.replace(model.meta, source=f"jaxroute adv-train ({cfg})")
    path = save_model(out / "model", model.variables, meta, overwrite=True)
    if res["adaptation"] is not None:  # already folded into the saved model; kept for inspection
        atomic_save_npz(out / "adaptation.npz", **res["adaptation"])
    last = res["epochs"][-1]
    losses = {k: last[k] for k in ("loss", "ce_clean", "ce_adv", "consistency", "coral", "mmd") if k in last}
    result = {"objective": cfg.objective, "epochs": len(res["epochs"]), "loss": last["loss"],
              "consistency": last["consistency"], "losses": losses, **acc, "eps": cfg.eps,
              "seconds_per_epoch": float(np.mean([e["seconds"] for e in res["epochs"] if "seconds" in e] or [0.0])),
              "weights": str(path)}
    human = (f"adversarial training ({cfg.objective}): {result['epochs']} epochs, "
             + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())
             + f"; test top1 clean {acc['clean_top1']:.4f}, FGSM {acc['fgsm_top1']:.4f}, PGD {acc['pgd_top1']:.4f} "
             f"(eps {cfg.eps:.4g}); {result['seconds_per_epoch']:.1f} s/epoch; model in {path}")
    return result, human


# --------------------------------------------------------------------------- trace
def cmd_trace(args):
    from jaxroute.analysis.probe import responses
    from jaxroute.analysis.tracing import trace_dataset
    from jaxroute.utils.io import atomic_save_npz, atomic_write_text, check_writable_dir

    if not np.isfinite(args.sigma) or args.sigma <= 0:
        raise ValueError(f"--sigma must be > 0, got {args.sigma}")
    if args.threshold is not None and not np.isfinite(args.threshold):
        raise ValueError(f"--threshold must be a finite PD, got {args.threshold}")
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    model.spec.check_points(args.point)
    c = dict(model.spec)[args.point]
    if not 1 <= args.top <= c:
        raise ValueError(f"--top must be in [1, {c}] for {args.point}, got {args.top}")
    real = data_for(model, args)
    corr = _class_correlation(args, real.class_names)
    images = _load_adv(args.adv, model, args.limit)["images"] if args.adv else np.asarray(real.images)
    r = trace_dataset(model, images, args.point, corr, top=args.top, threshold=args.threshold,
                     batch_size=args.batch_size)
    counted = r["top"][r["keep"]]
    counts = np.bincount(counted.ravel(), minlength=c)
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    # each frequent top neuron's own top real images (Fig. 10's right-hand grids)
    stats = responses(model, real.images, point=args.point, batch_size=args.batch_size)["stats"]
    off = model.spec.offsets[model.spec.names.index(args.point)]
    grids = {}
    for i in order[:8]:
        best = np.argsort(-stats[:, off + i], kind="stable")[:9]
        grids[i] = best
        _save_grid(np.asarray(real.images)[best], out / f"neuron_{i:04d}.png", f"{args.point} channel {i}")
    atomic_save_npz(out / "trace.npz", pd=r["pd"], top=r["top"], top_pd=r["top_pd"], keep=r["keep"],
                    **{f"neuron_{i}_top_images": v for i, v in grids.items()})
    res = {"n": int(len(images)), "pd_mean": float(r["pd"].mean()), "point": args.point,
           "top_neuron_counts": {str(i): int(counts[i]) for i in order}}
    atomic_write_text(out / "trace.json", json.dumps(res, indent=2))
    human = (f"PD at {args.point} on {res['n']} images: mean {res['pd_mean']:.4g}; most frequent top neurons "
             + ", ".join(f"{i} ({counts[i]})" for i in order[:5]) + f"; saved {out}")
    return res, human


def _save_grid(images, path, title):
    from matplotlib.figure import Figure

    n = len(images)
    fig = Figure(figsize=(3, 3.3))
    for j in range(n):
        ax = fig.add_subplot(3, 3, j + 1)
        im = images[j]
        ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray" if im.shape[-1] == 1 else None)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- parsers
def _wordnet_args(s):
    s.add_argument("--wordnet", required=True, help="folder with cifar10_wnids.tsv, wordnet.is_a.txt, words.txt")
    s.add_argument("--sigma", type=float, default=1.0, help="WordNet correlation width in edges (default 1, Eq. 2)")


def add_parsers(sub) -> None:
    s = sub.add_parser("probe", help="neuron consistency, feature ratios and Gaussian detection of adversarial images")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--adv", required=True, help="targeted adversarial set: DIR/SPLIT.npz from jaxroute attack")
    s.add_argument("--train-split", default="train", help="split for the Gaussian detector ('' skips it)")
    s.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    _wordnet_args(s)
    s.add_argument("--top-frac", type=float, default=0.01, help="top fraction of images per neuron (default 0.01)")
    s.add_argument("--reduce", choices=("max", "mean"), default="max", help="spatial reduction of a channel")
    s.add_argument("--point", default=None, help="gate point of φ for r1/r2 and detection (default: the last)")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--out", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_probe)

    from jaxroute.training.adversarial import CORAL_NORMS, MMD_KINDS, OBJECTIVE_DEFAULTS, OBJECTIVES, AdvTrainConfig

    d = AdvTrainConfig()
    dong, xie = OBJECTIVE_DEFAULTS["dong"], OBJECTIVE_DEFAULTS["xie"]
    s = sub.add_parser("adv-train", help="fine-tune with adversarial images and feature consistency / domain "
                                         "alignment (Dong et al. or Xie et al.; resumable)")
    add_model_args(s)
    add_data_args(s, split="train")
    s.add_argument("--out", required=True, help="run folder: train state per epoch, final model in OUT/model")
    s.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help="dong: targeted BIM, alpha-weighted cross-entropies (default); xie: untargeted FGSM on the "
                        "model's predictions, CE + CE_adv, CORAL and MMD behind an adaptation layer")
    s.add_argument("--alpha", type=float, default=d.alpha, help=f"dong: clean loss weight (default {d.alpha})")
    s.add_argument("--beta", "--lambda-consistency", dest="beta", type=float, default=None,
                   help=f"weight of ||phi(x) - phi(x_adv)||^2 (default: dong {dong['beta']:.4g}, "
                        f"xie {xie['beta']:.4g})")
    s.add_argument("--steps", type=int, default=d.steps, help=f"dong: attack steps T (default {d.steps})")
    s.add_argument("--step-eps", type=float, default=d.step_eps,
                   help="dong: attack step in [0, 1] pixels (default 1/255)")
    s.add_argument("--target", choices=("least_likely", "random"), default=d.target, help="dong: the attack's y*")
    s.add_argument("--eps", type=float, default=d.eps,
                   help=f"FGSM epsilon in [0, 1] pixels: xie's training attack, and the budget of the FGSM and "
                        f"PGD test accuracies of both objectives (default {d.eps})")
    s.add_argument("--lambda-coral", type=float, default=None,
                   help=f"CORAL weight (default: dong {dong['lambda_coral']:.4g}, xie {xie['lambda_coral']:.4g})")
    s.add_argument("--lambda-mmd", type=float, default=None,
                   help=f"MMD weight (default: dong {dong['lambda_mmd']:.4g}, xie {xie['lambda_mmd']:.4g})")
    s.add_argument("--coral-norm", default=d.coral_norm,
                   help=f"{' | '.join(CORAL_NORMS)}: Xie's Eq. 8 or Deep CORAL (default {d.coral_norm})")
    s.add_argument("--mmd", default=d.mmd,
                   help=f"{' | '.join(MMD_KINDS)}: Xie's Eq. 9 or the Gaussian-kernel MMD^2 (default {d.mmd})")
    s.add_argument("--adaptation", action=argparse.BooleanOptionalAction, default=None,
                   help="train an identity-initialised Dense(k) behind the features (default: xie yes, dong no)")
    s.add_argument("--feature", default=None, help="gate point of phi (default: the penultimate features)")
    s.add_argument("--epochs", type=int, default=d.epochs)
    s.add_argument("--batch-size", type=int, default=d.batch_size)
    s.add_argument("--lr", type=float, default=d.lr)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_adv_train)

    s = sub.add_parser("trace", help="prediction-difference tracing of the neurons a prediction rests on")
    add_model_args(s)
    add_data_args(s)
    s.add_argument("--adv", default=None, help="trace the images of this adversarial set instead of --data")
    s.add_argument("--point", required=True, help="gate point whose channels are removed one by one")
    s.add_argument("--top", type=int, default=2)
    s.add_argument("--threshold", type=float, default=None, help="count a top neuron only if its PD >= this")
    _wordnet_args(s)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_trace)
