"""Feature-space adversarial detectors on CIFAR-10: Table 2 of Wang, Hu, Su (arXiv:1910.02673).

    python -m experiments.feature_detectors --out reports/detectors [--models resnet20,resnet32]
        [--limit N] [--train-limit N] [--subnets DIR] [--cdrp]

With the pretrained CIFAR-10 ResNets of ``../shared`` on the CIFAR-10 JPEG test
set, one command writes into ``OUT``:

* Table 2: AUROC (%) of KD+PU (Feinman et al. 2017), LID (Ma et al. 2018) and
  Mahalanobis (Lee et al. 2018) against FGSM, BIM, DeepFool and CW-L2, each
  detector fitted on the attack it is tested on, beside the paper's numbers;
* its unknown-attack half: everything fitted on FGSM, tested on BIM,
  DeepFool and CW;
* per attack: the images kept by the selection (clean-correct, noisy-correct,
  adversarial-wrong), the attack's success rate and median L2, the noise σ
  of the twins; the ε (Mahalanobis) and k (LID) the validation chose;
* ``README.md`` (tables, deviations, the Mahalanobis-on-FGSM check),
  ``detectors.json`` (every number) and ``auroc.png``.

The protocol, the attacks and the detectors are :func:`jaxroute.detection.job.run_detection`'s
(``jaxroute adv-detect``): attacks in pixel units (FGSM ε = 0.05; BIM one step
of 0.01 then five more, no ball; DeepFool ≤ 5 iterations, overshoot 0.02;
CW-L2 c = 1, κ = 0, Adam 0.01, 100 steps, one round), noisy twins with the
attack's mean L2, the reference's block split (the first 10% of each block
trains ``LogisticRegressionCV``, half of it validates ε / k).

"Ours" (the class-subnetwork Mahalanobis detector, §5.2, Eq. 4-5;
:class:`jaxroute.detection.mahalanobis.SubnetMahalanobisScorer`) is a row of
both tables when class subnetworks are given: ``--subnets DIR`` with, for
each model, the first of ``DIR/<model>/subnets``, ``DIR/<model>`` and ``DIR``
that holds a ``subnets.npz`` (so the subnetwork experiment's ``OUT/cache``
serves every model, and a ``jaxroute subnet`` folder one model).  Without
``--subnets`` the row is left out, and so it is for a model whose
subnetworks ``DIR`` does not hold (the report says which); a ``DIR`` that
serves none of the models is an error.

"CDRP" (``--cdrp``) is a further row of both tables, which the paper does
not have: the DGR routing path of each image (Wang et al., CVPR 2018; the
paper's DGR settings) as its characteristic, through the same selection,
noisy twins, split and logistic regression as every other row
(:func:`jaxroute.detection.job.cdrp_characteristics`).  The DGR paper's
own detector (random forest, AdaBoost and gradient boosting on CDRPs of
real and targeted-adversarial images) is ``reports/cdrp``'s.  DGR runs 30
forward/backward passes per image over the test images and every attack's
selected twins: far slower than the other rows on a CPU.

Cache and resume: every model's attacks, features and characteristics live
under ``OUT/cache/<model>/`` (the detection job's layout, written atomically);
a run started again with the same arguments reuses them, and adding a model
keeps the others' cache, and so does adding ``--subnets`` (its files are keyed
by the gates) or ``--cdrp`` (its files are its own).  A cache written with other arguments is refused
(``OUT/cache/config.json``).  ``--limit N`` uses the first N test images
(class-interleaved), ``--train-limit N`` the first N training images for the
class statistics (means, covariance, kernel density); the report states both.

Deviations from the paper (listed in the report, :data:`DEVIATIONS`): the
shared ResNet-20/-32 (4 feature layers) instead of the paper's network;
CIFAR-10 decoded from JPEG files; predictive uncertainty from random
Bernoulli(0.5) gates at the last stage (the checkpoints have no dropout);
the correct LID neighbour rule by default; a subset of the test and training
images when limited; one split (``--runs 1``) unless asked for more.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from experiments.common import comma_list, configure_and_run
from jaxroute.utils.checks import check_int

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}
ATTACKS = ("fgsm", "bim", "deepfool", "cw")
DETECTORS = ("kd_pu", "lid", "mahalanobis")
LABELS = {"kd_pu": "KD+PU", "lid": "LID", "mahalanobis": "Mahalanobis", "subnet": "Ours (subnet Mahalanobis)",
          "cdrp": "CDRP (DGR routing paths)"}
ATTACK_LABELS = {"fgsm": "FGSM", "bim": "BIM", "deepfool": "DeepFool", "cw": "CW"}
# Wang, Hu, Su (arXiv:1910.02673) Table 2, CIFAR-10, AUROC % (no CDRP row: the report shows "–")
PAPER = {
    "kd_pu": {"fgsm": 81.21, "bim": 82.28, "deepfool": 81.07, "cw": 55.93},
    "lid": {"fgsm": 99.71, "bim": 96.39, "deepfool": 88.47, "cw": 82.93},
    "mahalanobis": {"fgsm": 99.92, "bim": 99.59, "deepfool": 91.53, "cw": 95.85},
    "subnet": {"fgsm": 99.97, "bim": 99.17, "deepfool": 91.91, "cw": 96.88},
}
SUBNETS_FILE = "subnets.npz"
PAPER_UNKNOWN = {   # fitted on FGSM
    "kd_pu": {"bim": 16.16, "deepfool": 76.80, "cw": 56.30},
    "lid": {"bim": 95.38, "deepfool": 71.86, "cw": 77.53},
    "mahalanobis": {"bim": 98.91, "deepfool": 78.06, "cw": 93.90},
    "subnet": {"bim": 99.11, "deepfool": 82.45, "cw": 95.62},
}
TARGET = 0.95   # Mahalanobis on FGSM, pretrained ResNet-20


@dataclasses.dataclass(frozen=True)
class Config:
    models_dir: str = str(SHARED / "models/cifar10-resnet")
    data: str = str(SHARED / "data/cifar10-jpeg")
    models: tuple = ("resnet20",)
    limit: int | None = 1000          # test images (None: all 10,000)
    train_limit: int | None = None    # training images for the class statistics (None: all 50,000)
    subnets: str | None = None        # class subnetworks (see subnets_dir): adds "Ours"
    cdrp: bool = False                # adds the CDRP row (DGR routing paths)
    lid_rule: str = "self"
    pu_passes: int = 50
    runs: int = 1
    batch_size: int = 100
    seed: int = 0

    # what the cached results depend on (the model list is not: adding a model resumes; nor are the
    # subnetworks: the detection job keys the subnet detector's files by a fingerprint of the gates,
    # so adding --subnets later reuses the attacks and the other detectors' features; nor is cdrp: its
    # characteristics are files of their own, the attacks and features are shared; nor is runs: the
    # reshuffled splits only refit the logistic regressions on the cached scores)
    CACHE_FIELDS = ("models_dir", "data", "limit", "train_limit", "lid_rule", "pu_passes", "batch_size", "seed")

    def __post_init__(self):
        models = tuple(self.models)
        if not models or any(m not in MODELS for m in models) or len(set(models)) != len(models):
            raise ValueError(f"models must be distinct names from {', '.join(MODELS)}, got {list(models)}")
        object.__setattr__(self, "models", models)
        for f in ("pu_passes", "runs", "batch_size"):
            v = getattr(self, f)
            low = 2 if f == "pu_passes" else 1
            check_int(v, f, low)
        check_int(self.seed, "seed", 0)
        # the protocol needs 40 selected images (the detection job says so when fewer are selected)
        for f, low in (("limit", 40), ("train_limit", 10)):
            check_int(getattr(self, f), f"{f} (None: all images)", low, allow_none=True)
        if not isinstance(self.cdrp, bool):
            raise ValueError(f"cdrp must be True or False, got {self.cdrp!r}")
        if self.lid_rule not in ("self", "all"):
            raise ValueError(f"lid_rule must be 'self' or 'all', got {self.lid_rule!r}")

    @property
    def detectors(self) -> tuple[str, ...]:
        return DETECTORS + (("subnet",) if self.subnets else ()) + (("cdrp",) if self.cdrp else ())

    def cache_key(self) -> dict:
        return {f: getattr(self, f) for f in self.CACHE_FIELDS}


def subnets_dir(root: str, model: str) -> Path:
    """The folder of ``model``'s class subnetworks under ``--subnets root``: the first of ``root/<model>/subnets``
    (the subnetwork experiment's cache), ``root/<model>`` and ``root`` holding a ``subnets.npz``."""
    root = Path(root)
    candidates = (root / model / "subnets", root / model, root)
    for c in candidates:
        if (c / SUBNETS_FILE).is_file():
            return c
    raise ValueError(f"subnets: no {SUBNETS_FILE} for {model} in {', '.join(map(str, candidates))}")


def found_subnets(cfg: Config) -> dict[str, Path]:
    """``{model: folder}`` of the models whose subnetworks ``--subnets`` holds; a model without them gets
    no "Ours" row (the report says so), and a ``--subnets`` that serves none of the models is an error."""
    found, missing = {}, []
    for m in cfg.models if cfg.subnets else ():
        try:
            found[m] = subnets_dir(cfg.subnets, m)
        except ValueError as e:
            missing.append(str(e))
    if cfg.subnets and not found:
        raise ValueError("; ".join(missing))
    return found


def with_subnets_found(cfg: Config) -> Config:
    """``cfg``, after checking that ``--subnets`` serves at least one model (a ValueError if not)."""
    found_subnets(cfg)
    return cfg


def run_label(cfg: Config) -> str:
    test = "full test set (10,000 images)" if cfg.limit is None else f"first {cfg.limit} test images (--limit {cfg.limit})"
    train = ("all 50,000 training images" if cfg.train_limit is None
             else f"the first {cfg.train_limit} training images (--train-limit {cfg.train_limit})")
    return f"{test}; class statistics from {train}"


def command(cfg: Config, out: str) -> str:
    parts = [f"python -m experiments.feature_detectors --out {out}", f"--models {','.join(cfg.models)}"]
    parts += [f"--limit {cfg.limit}"] if cfg.limit is not None else ["--limit 0"]
    if cfg.train_limit is not None:
        parts.append(f"--train-limit {cfg.train_limit}")
    if cfg.subnets:
        parts.append(f"--subnets {cfg.subnets}")
    if cfg.cdrp:
        parts.append("--cdrp")
    if cfg.lid_rule != "self":
        parts.append(f"--lid-rule {cfg.lid_rule}")
    if cfg.runs != 1:
        parts.append(f"--runs {cfg.runs}")
    return " ".join(parts)


def run(cfg: Config, out: Path, log=print) -> dict:
    """Every model's detection job, then ``detectors.json``, ``README.md`` and ``auroc.png`` in ``out``."""
    import numpy as np

    from jaxroute.data import Dataset, load_dataset
    from jaxroute.detection.density import KDPUConfig
    from jaxroute.detection.job import attack_summary, run_detection, subnet_gates
    from jaxroute.detection.lid import LIDConfig
    from jaxroute.models.gated import check_dataset_fits
    from jaxroute.utils.cache import Timings, check_cache_config
    from jaxroute.utils.io import atomic_write_json, atomic_write_text
    from jaxroute.weights import load_model

    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    check_cache_config(cache, cfg.cache_key())
    timings = Timings(cache / "timings.json", tuple(f"detect_{m}" for m in MODELS))
    test = load_dataset(cfg.data, "test", limit=cfg.limit)
    test = Dataset(np.asarray(test.images), np.asarray(test.labels), test.class_names, test.name)
    t = time.perf_counter()
    train = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    train = Dataset(np.asarray(train.images), np.asarray(train.labels), train.class_names, train.name)
    log(f"data: {len(test.labels)} test, {len(train.labels)} training images ({time.perf_counter() - t:.0f} s)")
    res: dict = {"config": dataclasses.asdict(cfg), "run": run_label(cfg), "n_test": int(len(test.labels)),
                 "n_train": int(len(train.labels)), "command": command(cfg, str(out)), "models": {}}
    models, gates, folders = {}, {}, found_subnets(cfg)
    for name in cfg.models:   # every model and its subnetworks checked before any model's work
        models[name] = load_model(name, Path(cfg.models_dir) / MODELS[name])
        check_dataset_fits(models[name], test)
        if name in folders:
            gates[name] = subnet_gates(folders[name], models[name])
        elif cfg.subnets:
            log(f"{name}: no {SUBNETS_FILE} under {cfg.subnets}; no Ours row for it")
    for name, model in models.items():
        weights = Path(cfg.models_dir) / MODELS[name]
        t = time.perf_counter()
        result = run_detection(
            model, test, train, out=cache / name, attacks=ATTACKS,
            detectors=[d for d in cfg.detectors if d != "subnet" or name in gates],
            lid=LIDConfig(drop_first=cfg.lid_rule), kd_pu=KDPUConfig(passes=cfg.pu_passes), subnets=gates.get(name),
            runs=cfg.runs, batch_size=cfg.batch_size, seed=cfg.seed,
            job={"weights": str(weights), "data": cfg.data},
            train_job={"split": "train", "limit": cfg.train_limit}, test_job={"split": "test", "limit": cfg.limit},
            log=log)
        timings.add(f"detect_{name}", time.perf_counter() - t)
        res["models"][name] = {"result": result, "attacks": attack_summary(cache / name, ATTACKS),
                               "clean_only": clean_only_aurocs(cache / name, cfg),
                               "lid_other_rule": other_lid_rule_aurocs(cache / name, cfg, log),
                               "seconds_total": timings.total.get(f"detect_{name}"),
                               "seconds_this_run": timings.now.get(f"detect_{name}")}
    res["target"] = target_check(res)
    atomic_write_json(out / "detectors.json", res)
    plot_auroc(res, out / "auroc.png")
    atomic_write_text(out / "README.md", report(res))
    log(f"wrote {out / 'README.md'}")
    return res


def clean_only_aurocs(cache: Path, cfg: Config) -> dict:
    """Mahalanobis AUROC per attack with the clean images in place of the noisy twins (a diagnostic; cached
    as ``mahalanobis-clean-only-runs<R>.json``).

    The same cached characteristics, split and choice of ε as the table, but the label-0 noisy
    block is the clean block again: how much of the gap to 1 the noisy twins cause.
    """
    import numpy as np

    from jaxroute.detection.mahalanobis import LEE_EPSILONS
    from jaxroute.detection.protocol import run_protocol
    from jaxroute.utils.cache import cached_json

    def compute() -> dict:
        chars = {}
        for a in ATTACKS:
            with np.load(Path(cache) / "scores" / f"mahalanobis-{a}.npz") as z:
                adv, clean = z["adv"], z["clean"]
            chars[a] = {f"eps={e:g}": (adv[:, :, k], clean[:, :, k], clean[:, :, k])
                        for k, e in enumerate(LEE_EPSILONS)}
        res = run_protocol(chars, runs=cfg.runs, seed=cfg.seed, known="fgsm")
        return {a: v["mean"] for a, v in res["known"].items()}

    return cached_json(Path(cache) / f"mahalanobis-clean-only-runs{cfg.runs}.json", compute)


def other_lid_rule_aurocs(cache: Path, cfg: Config, log=print) -> dict:
    """LID AUROC per attack under the other neighbour rule (a diagnostic; cached as
    ``lid-rule-<rule>-runs<R>.json``).

    An adversarial or noisy query's reference set is the clean mini-batch, which holds its own clean
    twin; the reference code's rule drops the first neighbour of every query, usually that twin, and
    the default rule keeps it.  Same cached features, selection, split and k choice as the table.
    """
    import json

    import numpy as np

    from jaxroute.detection.features import load_features
    from jaxroute.detection.lid import LIDConfig, lid_features
    from jaxroute.detection.protocol import run_protocol, select
    from jaxroute.extraction import load_shards
    from jaxroute.utils.cache import cached_json

    rule = "all" if cfg.lid_rule == "self" else "self"

    def compute() -> dict:
        points = json.loads((Path(cache) / "features" / "clean" / "manifest.json").read_text())["job"]["points"]
        clean = load_features(load_shards(Path(cache) / "features" / "clean"), points)
        chars, lcfg = {}, LIDConfig(drop_first=rule)
        for a in ATTACKS:
            with np.load(Path(cache) / "attacks" / f"{a}.npz") as z:
                i = np.flatnonzero(select(z["labels"], z["clean_pred"], z["noisy_pred"], z["adv_pred"]))
            twins = [[f[i] for f in load_features(load_shards(Path(cache) / "features" / f"{a}-{k}"), points)]
                     for k in ("adv", "noisy")]
            c, ad, no = lid_features([f[i] for f in clean], twins, lcfg)
            chars[a] = {f"k={k}": (ad[:, :, j], c[:, :, j], no[:, :, j]) for j, k in enumerate(lcfg.ks)}
        res = run_protocol(chars, runs=cfg.runs, seed=cfg.seed, known="fgsm")
        out = {"rule": rule, "known": {a: v["mean"] for a, v in res["known"].items()},
               "unknown": {a: v["mean"] for a, v in res["unknown"].items()}}
        log(f"LID with rule {rule!r}: " + ", ".join(f"{a} {v:.4f}" for a, v in out["known"].items()))
        return out

    return cached_json(Path(cache) / f"lid-rule-{rule}-runs{cfg.runs}.json", compute)


def split_rows(n: int) -> dict:
    """Adversarial / clean / noisy rows in the regression's fitting and validation parts for n selected images
    (the reference's block split; a validation part not divisible by 6 makes its slices cross blocks)."""
    import numpy as np

    from jaxroute.detection.protocol import block_split

    fit, val, _ = block_split(n)
    count = lambda rows: [int(np.sum(rows // n == b)) for b in range(3)]   # noqa: E731  (blocks: adv, clean, noisy)
    return {"fit": count(fit), "val": count(val)}


def target_check(res: dict) -> dict | None:
    """Whether Mahalanobis on FGSM for ResNet-20 reaches AUROC >= 0.95 (None without a ResNet-20 run)."""
    m = res["models"].get("resnet20")
    if m is None or "mahalanobis" not in m["result"]:
        return None
    auroc = m["result"]["mahalanobis"]["fgsm"]
    return {"auroc": auroc, "target": TARGET, "met": bool(auroc >= TARGET)}


def plot_auroc(res: dict, path: Path) -> None:
    """Grouped bars: measured AUROC per detector and attack for each model, the paper's as outlines."""
    import numpy as np
    from matplotlib.figure import Figure

    from jaxroute.utils.io import compact_png

    models = list(res["models"])
    dets = [d for d in LABELS if any(d in res["models"][m]["result"] for m in models)]
    fig = Figure(figsize=(2.2 * len(ATTACKS) + 1, 3.2))
    ax = fig.add_subplot()
    # a model without a detector's row (Ours needs its subnetworks) has no bar for it
    pairs = {d: [m for m in models if d in res["models"][m]["result"]] for d in dets}
    groups = sum(len(v) for v in pairs.values()) + sum(d in PAPER for d in dets)
    width = 0.8 / groups
    x = np.arange(len(ATTACKS))
    colours = {"kd_pu": "tab:orange", "lid": "tab:green", "mahalanobis": "tab:blue", "subnet": "tab:red",
               "cdrp": "tab:purple"}
    j = 0
    for d in dets:
        for m in pairs[d]:
            vals = [100 * res["models"][m]["result"][d][a] for a in ATTACKS]
            ax.bar(x + j * width, vals, width, color=colours[d], alpha=1.0 if m == models[0] else 0.6,
                   label=f"{LABELS[d].split(' (')[0]} {m}")
            j += 1
        if d in PAPER:
            ax.bar(x + j * width, [PAPER[d][a] for a in ATTACKS], width, fill=False, edgecolor=colours[d],
                   label=f"{LABELS[d].split(' (')[0]} paper")
            j += 1
    ax.set_xticks(x + 0.4 - width / 2, [ATTACK_LABELS[a] for a in ATTACKS])
    ax.set_ylim(0, 100)
    ax.set_ylabel("AUROC %")
    ax.legend(fontsize=6, ncol=len(dets), loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    compact_png(path)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _paper(table: dict, d: str, a: str) -> str:
    """The paper's AUROC (%) of detector ``d`` on attack ``a``; "–" where the paper has no such row."""
    return f"{table[d][a]:.2f}" if d in table else "–"


def _chosen(values) -> str:
    """The candidate(s) the validation chose, one per run."""
    vals = [str(v).split("=", 1)[-1] for v in values]
    return ", ".join(vals) if vals else "–"


DEVIATIONS = (
    "Network: the shared pretrained CIFAR-10 ResNet-20 and ResNet-32 (Idelbayev; 91.7% / 92.6% top-1 on the "
    "original test set), not the paper's network; their features are the spatial means of 4 layers (the stem and "
    "the 3 stage outputs) where Lee et al.'s ResNet-34 has 5.",
    "Data: CIFAR-10 decoded from the shared JPEG files (quality-75 re-encodings of the original pixels, on which the "
    "two models reach only 81.0% / 82.6% top-1 over the 10,000 test images); with `--limit` "
    "the first N test images in class-interleaved order, with `--train-limit` the first N training images for the "
    "class means, the tied covariance and the kernel density (Lee et al. and Feinman et al. use all 50,000).",
    "PU by random gates: the checkpoints have no dropout, so the 50 stochastic passes of the predictive uncertainty "
    "keep every channel at the gate points of the last stage with probability 0.5 (scaled by 2, inverted dropout), "
    "independently per image and pass, instead of MC dropout.",
    "LID rule: the reference code (its `mle_batch`, the common LID implementation) drops the first neighbour of "
    "every query, adversarial and noisy ones included; this table drops it only for clean queries (their "
    "self-match; `lid_rule` below), so an adversarial or noisy query's own clean twin in the reference batch "
    "counts as a neighbour. The diagnostic under the table gives the reference rule.",
    "Mahalanobis: channels constant over the training images (dead ReLUs; two of ResNet-20's 16 stem channels) are "
    "left out, which gives the distances of the reference's pseudo-inverse; the pre-processing step is formed in "
    "pixels (the reference divides by the normalisation std, the same step).",
    "Protocol: the reference's block split on a fixed permutation, reshuffled `runs` times (below; the AUROCs are "
    "the mean over the splits); the unknown-attack half reuses the candidate (ε / k) and the regression chosen "
    "and fitted on FGSM.",
    "Not included: \"Ours\" unless class subnetworks are given (`--subnets`); the CDRP row unless asked for "
    "(`--cdrp`); the DGR paper's own CDRP detectors (tree ensembles on real and targeted-adversarial CDRPs, "
    "`reports/cdrp`), whose protocol differs from this one.",
)
CDRP_DEVIATION = (
    "CDRP: not in the paper's Table 2. Each image's characteristic is its critical data routing path from DGR "
    "(Wang et al., CVPR 2018; the paper's settings: 30 SGD steps, lr 0.1, momentum 0.9, gates clipped to [0, 10], "
    "a fresh optimiser per image; L1 weight γ = 0.05), the flattened gates at every gate point; the clean, adversarial and "
    "noisy images are routed alike. The DGR paper trains random forests, AdaBoost and gradient boosting on CDRPs "
    "(`reports/cdrp`); here the CDRPs go through the protocol's logistic regression, so every row shares the "
    "selection, split and classifier; one candidate, no hyper-parameter to choose.")
SUBNET_DEVIATION = (
    "Ours: the class subnetworks given with `--subnets` (distilled by `jaxroute subnet`, whose manifest beside `subnets.npz` records the settings; not by the paper's code), "
    "gates at the model's gate points (after every BN+ReLU and residual ReLU); class c's feature at each of the 4 "
    "layers is read through class c's subnetwork, the class means from class c's training images through their own "
    "subnetwork, one tied covariance; Lee et al.'s input pre-processing (the paper: \"as in Lee et al.\") with the "
    "same ε grid, its gradient that of the closest class's distance through that class's subnetwork; scores "
    "−½ d as Lee et al.'s code (Eq. 5 has no ½; the regression absorbs the scale).")


def report(res: dict) -> str:
    """The Markdown report of a :func:`run` result."""
    cfg = res["config"]
    models = list(res["models"])
    lines = [
        "# Feature-space adversarial detectors on CIFAR-10 (Table 2 of Wang, Hu, Su, arXiv:1910.02673)", "",
        f"Run: **{res['run']}**; models {', '.join(models)}. Regenerate with `{res['command']}`.", "",
        "AUROC (%) of each detector, fitted and tested on the same attack (the paper's value after the slash). "
        "Attacks in pixel units: FGSM ε = 0.05; BIM one step of 0.01 then five more (no ball); DeepFool ≤ 5 "
        "iterations, overshoot 0.02; CW-L2 c = 1, κ = 0, Adam 0.01, 100 steps, one round.", "",
    ]
    for m in models:
        r = res["models"][m]["result"]
        dets = [d for d in LABELS if d in r]
        lines += [f"## {m}", "", "### Table 2: known attack", "",
                  "| detector | " + " | ".join(ATTACK_LABELS[a] for a in ATTACKS) + " |",
                  "|---|" + "---:|" * len(ATTACKS)]
        for d in dets:
            lines.append(f"| {LABELS[d]} | " + " | ".join(
                f"{_pct(r[d].get(a))} / {_paper(PAPER, d, a)}" for a in ATTACKS) + " |")
        if res["models"][m].get("clean_only"):
            co = res["models"][m]["clean_only"]
            lines += ["", "Diagnostic, not in the paper: Mahalanobis with the clean images in place of the noisy "
                      "twins (same characteristics, split and ε choice): "
                      + ", ".join(f"{ATTACK_LABELS[a]} {_pct(co[a])}" for a in ATTACKS) + "."]
        if res["models"][m].get("lid_other_rule"):
            lo = res["models"][m]["lid_other_rule"]
            lines += ["", f"Diagnostic: LID with the neighbour rule `{lo['rule']}` (" + (
                "the reference code's: the first neighbour of every query is dropped, for an adversarial or noisy "
                "query often its own clean twin, which is in the clean reference batch" if lo["rule"] == "all" else
                "the first neighbour is dropped for clean queries only") + "): "
                + ", ".join(f"{ATTACK_LABELS[a]} {_pct(lo['known'][a])}" for a in ATTACKS) + "; fitted on FGSM: "
                + ", ".join(f"{ATTACK_LABELS[a]} {_pct(lo['unknown'][a])}" for a in ATTACKS if a in lo["unknown"])
                + "."]
        if cfg.get("subnets") and "subnet" not in r:
            lines += ["", f"Ours: no class subnetworks of {m} were given (no `{SUBNETS_FILE}` for it under "
                      "`--subnets`), so its row is left out."]
        unk = [a for a in ATTACKS if a != "fgsm"]
        lines += ["", "### Unknown attack: fitted on FGSM", "",
                  "| detector | " + " | ".join(ATTACK_LABELS[a] for a in unk) + " |", "|---|" + "---:|" * len(unk)]
        for d in dets:
            lines.append(f"| {LABELS[d]} | " + " | ".join(
                f"{_pct(r['unknown'].get(d, {}).get(a))} / {_paper(PAPER_UNKNOWN, d, a)}" for a in unk) + " |")
        if r.get("runs", 1) > 1:
            lines += ["", f"Mean of {r['runs']} reshuffles; std (known attack, %): " + "; ".join(
                f"{LABELS[d]} " + " / ".join(_pct(r[f'{d}_std'][a]) for a in ATTACKS) for d in dets)]
        att = res["models"][m]["attacks"]
        ours = "subnet" in r
        lines += ["", "### Attacks, selection and chosen hyper-parameters", "",
                  "| attack | success | median L2 | noise σ | noisy twins correct | selected | regression fit rows "
                  "(adv / clean / noisy) | validation rows | Mahalanobis ε | LID k |" + (" Ours ε |" if ours else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ours else "")]
        for a in ATTACKS:
            s = att[a]
            rows = split_rows(r["n_selected"][a])
            l2 = "–" if s["median_l2"] is None else f"{s['median_l2']:.3f}"
            noisy = "–" if s["noisy_correct"] is None else f"{s['noisy_correct']:.3f}"
            lines.append(f"| {ATTACK_LABELS[a]} | {s['success_rate']:.3f} | {l2} | {s['noise_sigma']:.4f} | {noisy} | "
                         f"{r['n_selected'][a]} of {s['n']} | {' / '.join(map(str, rows['fit']))} | "
                         f"{' / '.join(map(str, rows['val']))} | {_chosen(r.get('chosen_eps', {}).get(a, []))} | "
                         f"{_chosen(r.get('chosen_k', {}).get(a, []))} |"
                         + (f" {_chosen(r['chosen']['subnet'].get(a, []))} |" if ours else ""))
        clean_ok = att[ATTACKS[0]]["clean_correct"]
        lines += ["", f"Clean accuracy on these images {clean_ok / att[ATTACKS[0]]['n']:.4f}. Success and median L2 "
                  "over the clean-correct images (L2 of the successful adversarials, pixels in [0, 1]); selected = "
                  "clean-correct, noisy-correct and adversarial-wrong. Feature layers: "
                  + ", ".join(f"`{p}`" for p in r["points"]) + f"; LID rule `{r['lid_rule']}`.", ""]
    t = res.get("target")
    lines += ["## Mahalanobis on FGSM, ResNet-20: AUROC ≥ 0.95?", ""]
    if t is None:
        lines += ["Not measured in this run (no ResNet-20).", ""]
    else:
        lines += [("Yes" if t["met"] else "No") + f": {t['auroc']:.4f} (target ≥ {t['target']}; the paper: "
                  "0.9992). The gap to the paper: " + gap_text(res), ""]
    ours = any("subnet" in res["models"][m]["result"] for m in models)
    cdrp = any("cdrp" in res["models"][m]["result"] for m in models)
    extra = ((SUBNET_DEVIATION,) if ours else ()) + ((CDRP_DEVIATION,) if cdrp else ())
    lines += ["## Deviations from the paper", ""] + [f"- {d}" for d in DEVIATIONS + extra] + [
        "", f"Settings: LID rule `{cfg['lid_rule']}`, {cfg['pu_passes']} stochastic passes, {cfg['runs']} split(s), "
        f"seed {cfg['seed']}; {res['n_test']} test and {res['n_train']} training images.", "",
        "![AUROC per detector and attack; outlined bars: the paper](auroc.png)", ""]
    return "\n".join(lines)


def gap_text(res: dict) -> str:
    """Why ResNet-20's Mahalanobis AUROC on FGSM differs from the paper's 99.92%, from the run's own figures."""
    m = res["models"]["resnet20"]
    f, r = m["attacks"]["fgsm"], m["result"]
    rows = split_rows(r["n_selected"]["fgsm"])
    return (
        f"(1) the noisy twins: this protocol matches their Gaussian noise to the attack's mean L2, which for "
        f"FGSM at ε = 0.05 is σ = {f['noise_sigma']:.4f} per pixel, and only {100 * f['noisy_correct']:.1f}% of "
        f"the clean-correct images stay correct under it; the reference code (`ADV_Samples.py`, ResNet, "
        f"CIFAR-10) adds a fixed 0.25/4 in normalised units, about 0.0126 per pixel, about a quarter of this. "
        f"Noise this strong moves the real (label 0) noisy images away from the class Gaussians as well, so "
        f"they overlap the adversarial ones more, and the selection keeps {r['n_selected']['fgsm']} of "
        f"{f['n']} images"
        + (f"; with the clean images in place of the noisy twins the same characteristics give "
           f"{_pct(m['clean_only']['fgsm'])}%" if m.get("clean_only") else "")
        + f". (2) The network: 4 feature layers of 16 to 64 channels, 81% top-1 on the JPEG "
        f"test images, where Lee et al.'s ResNet-34 has 5 layers up to 512 channels. (3) The split: the "
        f"logistic regression is fitted on {' / '.join(map(str, rows['fit']))} adversarial / clean / noisy rows "
        f"and ε is chosen on {' / '.join(map(str, rows['val']))} (the reference's block split of the first 10% of "
        f"the selected images), "
        + ("in one split without reshuffles." if r.get("runs", 1) == 1 else
           f"the AUROC the mean over {r['runs']} reshuffles of that split (std "
           f"{_pct(r['mahalanobis_std']['fgsm'])} points)."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    p.add_argument("--out", default="reports/detectors")
    p.add_argument("--models", default=",".join(d.models), help="comma-separated: resnet20, resnet32")
    p.add_argument("--limit", type=int, default=d.limit, help="first N test images (0: all 10,000)")
    p.add_argument("--train-limit", type=int, default=None, help="first N training images (default: all 50,000)")
    p.add_argument("--subnets", default=None, help="class subnetworks: adds the subnet Mahalanobis detector (Ours); "
                   "per model the first of DIR/<model>/subnets, DIR/<model>, DIR holding subnets.npz")
    p.add_argument("--cdrp", action="store_true", help="adds the CDRP row: DGR routing paths as the characteristic "
                   "(30 forward/backward passes per image: slow on a CPU); reuses the cached attacks")
    p.add_argument("--lid-rule", choices=("self", "all"), default=d.lid_rule)
    p.add_argument("--pu-passes", type=int, default=d.pu_passes)
    p.add_argument("--runs", type=int, default=d.runs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--models-dir", default=d.models_dir)
    p.add_argument("--data", default=d.data)
    args = p.parse_args(argv)
    return configure_and_run(p, lambda: with_subnets_found(Config(
        models_dir=str(Path(args.models_dir).resolve()), data=str(Path(args.data).resolve()),
        models=comma_list(args.models), limit=args.limit or None, train_limit=args.train_limit,
        subnets=args.subnets, cdrp=args.cdrp,
        lid_rule=args.lid_rule, pu_passes=args.pu_passes, runs=args.runs, batch_size=args.batch_size,
        seed=args.seed)), run, args.out)


if __name__ == "__main__":
    sys.exit(main())
