"""``jaxroute adv-detect``: feature-space adversarial detectors (Mahalanobis, LID, KD+PU) and their protocol.

Everything is cached under ``--out`` and a rerun resumes:

    attacks/<attack>.npz           adversarial and noisy twins of the test images, their predictions
    features/<set>/                pooled stage features, penultimate features and logits (extraction job)
    scores/<detector>-<attack>.npz the detector's characteristics of the selected images, per candidate
    result.json                    the AUROCs
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxroute.cli.common import add_data_args, add_model_args, data_for, log, model_from_args

DETECTORS = ("kd_pu", "lid", "mahalanobis", "subnet")
ATTACK_NAMES = ("fgsm", "bim", "deepfool", "cw")


def protocol_configs() -> dict:
    """The attacks of Lee et al.'s protocol, in pixel units (see :mod:`jaxroute.detection.protocol`)."""
    from jaxroute.attacks import BIMConfig, CWConfig, DeepFoolConfig, FGSMConfig

    return {
        "fgsm": FGSMConfig(eps=0.05),
        "bim": BIMConfig(eps=0.01, steps=6),                 # one step of 0.01, then five more; no ball
        "deepfool": DeepFoolConfig(max_iter=5, overshoot=0.02),
        "cw": CWConfig(initial_c=1.0, kappa=0.0, lr=0.01, steps=100, binary_search_steps=1),
    }


def _names(text: str, allowed, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return names


def _attack(model, ds, name, cfg, out: Path, seed: int, batch_size: int) -> dict:
    """Adversarial and noisy twins of the test images (cached)."""
    import jax
    import numpy as np

    from jaxroute.attacks import attack_dataset
    from jaxroute.detection.protocol import noise_sigma, noisy_twins
    from jaxroute.utils.devices import map_batches
    from jaxroute.utils.io import atomic_save_npz

    path = out / "attacks" / f"{name}.npz"
    if path.exists():
        with np.load(path) as z:
            if len(z["labels"]) == len(ds.images):
                return dict(z)
        raise ValueError(f"{path} holds another number of images than the data; use another --out")
    log(f"attack {name} on {len(ds.images)} images")
    images = np.asarray(ds.images, np.float32)
    labels = np.asarray(ds.labels)
    key = jax.random.key(seed)
    arrays = attack_dataset(model.logits, images, labels, attack=name, config=cfg[name],
                            key=jax.random.fold_in(key, 0), batch_size=batch_size)
    ok = arrays["success"].astype(bool)
    sigma = noise_sigma(arrays["l2"][ok] if ok.any() else arrays["l2"], images.shape[1:])
    kn = jax.random.fold_in(key, 1)
    noisy = map_batches(jax.jit(lambda i, x: noisy_twins(x, sigma, jax.random.fold_in(kn, i))), (images,),
                        min(batch_size, len(images)))
    pred = map_batches(jax.jit(lambda i, x: jnp_argmax(model.logits(x))), (noisy,), min(batch_size, len(images)))
    res = {"adv": arrays["images"], "adv_pred": arrays["adv_pred"], "l2": arrays["l2"], "labels": labels,
           "clean_pred": arrays["clean_pred"], "noisy": noisy, "noisy_pred": pred, "sigma": np.float64(sigma)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, **res)
    return res


def jnp_argmax(logits):
    import jax.numpy as jnp

    return jnp.argmax(logits, -1)


def _features(model, points, images, labels, class_names, out: Path, job: dict, batch_size: int) -> dict:
    """Pooled features, penultimate features and logits of ``images`` through the extraction job (resumable)."""
    import numpy as np

    from jaxroute.data import Dataset
    from jaxroute.detection.features import feature_fn
    from jaxroute.extraction import load_shards, plan_batches, run_extraction

    ds = Dataset(np.asarray(images, np.float32), np.asarray(labels, np.int32), tuple(class_names), job["set"])
    plan = plan_batches(len(ds.images), batch_size, 1000)
    run_extraction(feature_fn(model, points), ds, out, job=job, plan=plan, progress=False, desc=job["set"], log=log)
    return load_shards(out)


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
    import jax
    import numpy as np

    from jaxroute.detection.density import KDPUConfig, KernelDensity, uncertainty, zscore
    from jaxroute.detection.features import load_features, stage_points
    from jaxroute.detection.lid import LIDConfig, lid_features
    from jaxroute.detection.mahalanobis import MahalanobisConfig, MahalanobisScorer
    from jaxroute.detection.protocol import MIN_SELECTED, run_protocol, select
    from jaxroute.utils.io import atomic_save_npz, check_writable_dir

    attacks = _names(args.attacks, ATTACK_NAMES, "attack(s)")
    detectors = _names(args.detectors, DETECTORS, "detector(s)")
    if "subnet" in detectors:
        if not args.subnets:
            raise ValueError("the subnet detector needs --subnets DIR (class subnetworks)")
        raise ValueError(f"--subnets {args.subnets}: this command computes no class-subnetwork features; "
                         "use kd_pu, lid or mahalanobis")
    for name in ("runs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_limit is not None and args.train_limit < 1:
        raise ValueError(f"--train-limit must be >= 1, got {args.train_limit}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    # the detectors' settings are checked before any feature or attack is computed
    mcfg = (MahalanobisConfig(**({"epsilons": _floats(args.eps, "--eps")} if args.eps is not None else {}))
            if "mahalanobis" in detectors else None)
    lcfg = (LIDConfig(drop_first=args.lid_rule, **({"ks": _ints(args.lid_k, "--lid-k")} if args.lid_k is not None else {}))
            if "lid" in detectors else None)
    kcfg = KDPUConfig(bandwidth=args.bandwidth, passes=args.pu_passes) if "kd_pu" in detectors else None
    out = check_writable_dir(args.out)
    model = model_from_args(args, need_weights=True)
    test = data_for(model, args)
    if test.labels is None:
        raise ValueError(f"data {test.name!r} has no labels; the protocol needs the true labels")
    train = data_for(model, args, split=args.train_split)
    if args.train_limit is not None:
        from jaxroute.data import Dataset

        train = Dataset(np.asarray(train.images[:args.train_limit]), np.asarray(train.labels[:args.train_limit]),
                        train.class_names, train.name)
    points = stage_points(model)
    base = {"model": model.name, "weights": str(args.weights or ""), "data": args.data, "points": list(points)}
    names = test.class_names
    feats = {"train": _features(model, points, train.images, train.labels, names, out / "features" / "train",
                                {**base, "set": "train", "split": args.train_split, "limit": args.train_limit},
                                args.batch_size)}
    feats["clean"] = _features(model, points, test.images, test.labels, names, out / "features" / "clean",
                               {**base, "set": "clean", "split": args.split, "limit": args.limit}, args.batch_size)
    cfg = protocol_configs()
    adv, sel = {}, {}
    for a in attacks:
        adv[a] = _attack(model, test, a, cfg, out, args.seed, args.batch_size)
        for kind in ("adv", "noisy"):
            feats[f"{a}-{kind}"] = _features(
                model, points, adv[a][kind], test.labels, names, out / "features" / f"{a}-{kind}",
                {**base, "set": f"{a}-{kind}", "split": args.split, "limit": args.limit}, args.batch_size)
        sel[a] = np.flatnonzero(select(test.labels, adv[a]["clean_pred"], adv[a]["noisy_pred"], adv[a]["adv_pred"]))
        if len(sel[a]) < MIN_SELECTED:
            raise ValueError(f"attack {a}: only {len(sel[a])} images are clean-correct, noisy-correct and "
                             f"adversarial-wrong; the protocol needs at least {MIN_SELECTED} (use more images)")
        log(f"{a}: {len(sel[a])} of {len(test.images)} images selected")

    def cached(name, setting: dict, compute):
        """Characteristics from ``scores/<name>.npz``, computed and saved when absent; a file
        computed with other settings is refused rather than mixed in."""
        path = out / "scores" / f"{name}.npz"
        tag = json.dumps(setting, sort_keys=True)
        if path.exists():
            with np.load(path) as z:
                if str(z["setting"]) != tag:
                    raise ValueError(f"{path} was computed with other settings ({z['setting']} vs {tag}); "
                                     "use another --out")
                return {k: z[k] for k in z.files if k != "setting"}
        res = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npz(path, setting=np.array(tag), **res)
        return res

    chars: dict = {d: {} for d in detectors}
    if "mahalanobis" in detectors:
        scorer = MahalanobisScorer(model, points, mcfg, batch_size=args.batch_size)
        scorer.fit(load_features(feats["train"], points), feats["train"]["label"])
        for a in attacks:
            i = sel[a]
            s = cached(f"mahalanobis-{a}", {"epsilons": mcfg.epsilons, "shrinkage": mcfg.shrinkage}, lambda: {
                "adv": scorer.score(adv[a]["adv"][i]), "clean": scorer.score(np.asarray(test.images)[i]),
                "noisy": scorer.score(adv[a]["noisy"][i])})
            chars["mahalanobis"][a] = {f"eps={e:g}": (s["adv"][:, :, k], s["clean"][:, :, k], s["noisy"][:, :, k])
                                       for k, e in enumerate(mcfg.epsilons)}
    if "lid" in detectors:
        for a in attacks:
            i = sel[a]

            def compute(a=a, i=i):
                c, ad, no = lid_features([f[i] for f in load_features(feats["clean"], points)],
                                         [[f[i] for f in load_features(feats[f"{a}-{k}"], points)]
                                          for k in ("adv", "noisy")], lcfg)
                return {"adv": ad, "clean": c, "noisy": no}
            s = cached(f"lid-{a}", {"ks": lcfg.ks, "rule": lcfg.drop_first, "batch": lcfg.batch_size}, compute)
            chars["lid"][a] = {f"k={k}": (s["adv"][:, :, j], s["clean"][:, :, j], s["noisy"][:, :, j])
                               for j, k in enumerate(lcfg.ks)}
    if "kd_pu" in detectors:
        kd = KernelDensity(kcfg.bandwidth).fit(feats["train"]["penultimate"], feats["train"]["label"])
        key = jax.random.key(args.seed + 1)
        for a in attacks:
            i = sel[a]

            def compute(a=a, i=i):
                sets = {"adv": (feats[f"{a}-adv"], adv[a]["adv"]), "clean": (feats["clean"], test.images),
                        "noisy": (feats[f"{a}-noisy"], adv[a]["noisy"])}
                res = {}
                for j, (k, (f, imgs)) in enumerate(sets.items()):
                    dens = kd.score(f["penultimate"][i], np.argmax(f["logits"][i], -1))
                    unc = uncertainty(model, np.asarray(imgs)[i], jax.random.fold_in(key, j), kcfg, args.batch_size)
                    res[k] = np.stack([dens, unc], 1)
                return res
            s = cached(f"kd_pu-{a}", {"bandwidth": kcfg.bandwidth, "passes": kcfg.passes, "keep": kcfg.keep}, compute)
            z = zscore(s["adv"], s["clean"], s["noisy"])
            chars["kd_pu"][a] = {"-": tuple(z)}

    result = {"n_selected": {a: int(len(sel[a])) for a in attacks}, "unknown": {}, "chosen_eps": {}, "chosen_k": {},
              "runs": args.runs, "lid_rule": args.lid_rule, "points": list(points)}
    for d in detectors:
        res = run_protocol(chars[d], runs=args.runs, seed=args.seed, known="fgsm")
        result[d] = {a: v["mean"] for a, v in res["known"].items()}
        result[f"{d}_std"] = {a: v["std"] for a, v in res["known"].items()}
        result["unknown"][d] = {a: v["mean"] for a, v in res["unknown"].items()}
        if d == "mahalanobis":
            result["chosen_eps"] = {a: v["chosen"] for a, v in res["known"].items()}
        if d == "lid":
            result["chosen_k"] = {a: v["chosen"] for a, v in res["known"].items()}
    (out / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    lines = [f"{'detector':12s} " + " ".join(f"{a:>9s}" for a in attacks)]
    for d in detectors:
        lines.append(f"{d:12s} " + " ".join(f"{100 * result[d][a]:9.2f}" for a in attacks))
        if result["unknown"].get(d):
            lines.append(f"{'  from fgsm':12s} " + " ".join(
                f"{100 * result['unknown'][d][a]:9.2f}" if a in result["unknown"][d] else f"{'':9s}" for a in attacks))
    return result, "AUROC %\n" + "\n".join(lines)


def add_parsers(sub) -> None:
    p = sub.add_parser("adv-detect", help="feature-space adversarial detectors (Mahalanobis, LID, KD+PU)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--train-split", default="train", help="split the class statistics are fitted on")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--attacks", default="fgsm,bim,deepfool,cw")
    p.add_argument("--detectors", default="kd_pu,lid,mahalanobis")
    p.add_argument("--subnets", default=None, help="class subnetworks (for the subnet detector)")
    p.add_argument("--lid-rule", choices=("self", "all"), default="self",
                   help="LID neighbour rule: drop only a clean query's self-match (default), or the first "
                        "neighbour of every query as the reference code")
    p.add_argument("--eps", default=None, help="Mahalanobis pre-processing magnitudes, comma-separated "
                   "(default: the reference's seven, 0,0.01,0.005,0.002,0.0014,0.001,0.0005)")
    p.add_argument("--lid-k", default=None, help="LID neighbour counts, comma-separated (default 10,20,...,90)")
    p.add_argument("--bandwidth", type=float, default=0.26, help="KD bandwidth (0.26: Feinman et al., CIFAR-10)")
    p.add_argument("--pu-passes", type=int, default=50, help="stochastic passes of the predictive uncertainty")
    p.add_argument("--runs", type=int, default=1, help="reshuffles of the split; AUROC mean ± std")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="cache and result directory (resumable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_adv_detect)
