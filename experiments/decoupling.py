"""Network decoupling on CIFAR-10 with the pretrained ResNet-20: Table 2 (control vs decoupled),
Fig. 4 (energetic / silent / dynamic filters per layer), per-layer V-measure of the paths
against the classes, the single-thread speed of the gathered forward, adversarial detection
on calculation paths (Table 4), a t-SNE of the paths (Fig. 3) and one attack's path (Fig. 7).

    python -m experiments.decoupling --out reports/decoupling                 # the report schedule
    python -m experiments.decoupling --out /tmp/dec --limit 512 --epochs 1 \
        --test-per-class 5 --train-per-class 10 --sizes 1,5 --runs 2          # a smoke run

Schedule (the report's short one): ``--frozen-epochs`` (3) epochs training the
controllers only at lr 0.1, then ``--epochs`` (12) joint epochs at lr 0.01,
divided by 10 at 50 % and 75 %; the paper's losses and weights.  The control
fine-tunes the plain network on the same data for the same joint epochs with CE only
(:func:`jaxroute.training.fit`: SGD, Nesterov momentum 0.9, cosine lr from 0.01,
weight decay 1e-4, crop + flip), since fine-tuning on the JPEG images alone moves accuracy.

Analyses of the trained decoupled network (Li et al., "Learning to decouple" / network
decoupling, CVPR 2020), on the fixed sets of the CDRP experiment (``reports/cdrp``,
:mod:`experiments.cdrp_analysis`): test set = the first ``--test-per-class`` (100) test
images per class, detector training pool = the first ``--train-per-class`` (200) train
images per class.  These sets are taken from the full splits whatever ``--limit`` says
(``--limit`` shrinks the training and Table 2 sets only), so the analyses of a short run
are made on the same images as those of the report run and of ``reports/cdrp``.

* Table 4 (paper: calculation paths vs DGR's CDRPs for adversarial detection): targeted
  I-FGSM of the DGR paper (Eq. 6: step ``--eps`` 0.01, ``--attack-steps`` 10, no eps-ball,
  clipped to [0, 1]) against the decoupled network, targets one seeded class derangement
  (as ``reports/cdrp``); random forest, AdaBoost and gradient boosting on the flattened
  calculation paths (672 binary gates) of real vs adversarial images, and on the decoupled
  network's penultimate features as the baseline
  (:func:`jaxroute.detection.evaluate_protocol`: ``--sizes`` 10/50/100 training images per
  class with their adversarial twins drawn from the pool, ``--runs`` 5, AUC from predicted
  probabilities, mean ± std).  The DGR CDRP rows of the same protocol are read from
  ``reports/cdrp/cdrp.json`` when its configuration matches; those adversarials were crafted
  against the *plain* network, so the two halves of the table compare detectors across
  attacks on two different networks.
* Fig. 3: PCA to min(300, N, D) dimensions, then t-SNE, of the whole calculation paths of the
  test set, coloured by class (``fig3_paths_tsne.png``); K-means (K = 10) on the whole paths
  scored against the classes (V-measure).
* Fig. 7 (dog -> truck): the first test image of ``--source`` (dog) that the network
  classifies correctly and whose targeted I-FGSM to ``--target`` (truck) succeeds (if there is
  none, the first whose attack succeeds, marked in the report); per layer
  the fraction of filters on for that image, its adversarial twin and the mean paths of the
  real test images of both classes, and the per-layer Pearson correlation of the adversarial
  path with the two class mean paths (:func:`jaxroute.analysis.layer_correlations`)
  (``fig7_dog_truck.png``).

Deviations from the paper in these analyses:

* CIFAR-10 (JPEG re-encodings) and ResNet-20 instead of ImageNet and VGG / ResNet-18/50.
* Table 4 with 10 / 50 / 100 training images per class instead of 1 / 5 / 10: ImageNet's
  1,000 classes give 1k-10k training pairs, CIFAR-10's 10 classes 100-1,000; test set and
  pool as ``reports/cdrp`` so that the CDRP rows apply.
* The attack: the paper names none; the DGR paper's targeted I-FGSM is used so that the
  comparison with ``reports/cdrp`` is like for like.  The attack differentiates the decoupled
  network as it runs (``model.logits``, eval mode): every iterate's forward computes its own z
  = 1(Ḡ > 0), and since that step has zero derivative the gradient is the backbone's with z
  held constant at the values of that forward (no straight-through estimate through the
  controllers).
* Fig. 7's class paths are the mean z of all real test images of the class (the chosen image
  included).

Resumable: each stage writes its JSON into ``OUT`` and is skipped when that file exists;
the decoupled training itself resumes from its per-epoch checkpoint (``OUT/decoupled``).
Adversarial images (``OUT/cache/adv/*.npz``) and the paths and features of every set
(``OUT/cache/paths/*.npz``) are written atomically and reused; a cache written with other
analysis arguments is refused (``OUT/cache/config.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np

from experiments.common import comma_list
from jaxroute.utils.checks import check_int

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_CDRP_REPORT = REPO / "reports/cdrp/cdrp.json"


def _stage(out: Path, name: str, fn):
    """``OUT/name.json``: read back when present, else ``fn()`` written atomically."""
    from jaxroute.utils.cache import cached_json

    return cached_json(out / f"{name}.json", fn)


def v_measures(z: dict, labels: np.ndarray) -> dict:
    """Per layer: V-measure between the classes and the clusters 'inputs with the same layer path'."""
    from sklearn.metrics import v_measure_score

    out = {}
    for p, v in z.items():
        _, cluster = np.unique(np.asarray(v) > 0.5, axis=0, return_inverse=True)
        out[p] = float(v_measure_score(labels, cluster.ravel()))
    return out


# --------------------------------------------------------------------------- analyses (Table 4, Fig. 3, Fig. 7)
@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """The analyses' protocol; defaults are those of ``reports/cdrp`` (module doc)."""

    data: str = str(SHARED / "data/cifar10-jpeg")
    test_per_class: int = 100     # fixed test set: the first N per class of the test split
    train_per_class: int = 200    # detector training pool: the first N per class of the train split
    sizes: tuple = (10, 50, 100)  # detector training images per class
    runs: int = 5
    classifiers: tuple = ("random_forest", "adaboost", "gradient_boosting")
    eps: float = 0.01             # I-FGSM step (DGR paper Eq. 6)
    attack_steps: int = 10
    seed: int = 0                 # target derangement, detector draws, t-SNE, K-means
    batch_size: int = 128
    pca_dims: int = 300           # Fig. 3: PCA before t-SNE
    source: str = "dog"           # Fig. 7: attacked class ...
    target: str = "truck"         # ... and the attack's target
    cdrp_report: str = str(CIFAR_CDRP_REPORT)

    # fields that determine the cached adversarial images and stage results
    CACHE_FIELDS = ("data", "test_per_class", "train_per_class", "sizes", "runs", "classifiers", "eps",
                    "attack_steps", "seed", "pca_dims", "source", "target")

    def __post_init__(self):
        from jaxroute.detection.detector import check_protocol

        for f in ("test_per_class", "train_per_class", "attack_steps", "batch_size", "pca_dims"):
            v = getattr(self, f)
            check_int(v, f)
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "classifiers", tuple(self.classifiers))
        check_protocol(self.sizes, self.runs, self.classifiers, self.seed)
        if max(self.sizes) > self.train_per_class:
            raise ValueError(f"the largest training size ({max(self.sizes)}/class) exceeds the training pool "
                             f"(train_per_class = {self.train_per_class})")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (
                math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        if self.source == self.target:
            raise ValueError(f"source and target must be two different classes, got {self.source!r} twice")

    def cache_key(self) -> dict:
        return {f: getattr(self, f) for f in self.CACHE_FIELDS}


def analysis_sets(cfg: AnalysisConfig):
    """(test set, training pool): the first N images per class of each full split."""
    from jaxroute.analysis import load_first_per_class

    return (load_first_per_class(cfg.data, "test", cfg.test_per_class),
            load_first_per_class(cfg.data, "train", cfg.train_per_class))


def dgr_rows(path, cfg: AnalysisConfig) -> tuple[dict | None, str]:
    """The CDRP experiment's detection rows ({feature: rows}) for the same protocol, and a note.

    ``detection`` of ``cdrp.json`` is the table of its targeted derangement attack ("perm"),
    the attack used here; it applies only when the sets, sizes, runs, classifiers, seed and
    attack are the same (otherwise None and a note naming what differs).
    """
    import json

    path = Path(path).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path  # the report names it as the repository does
    if not path.is_file():
        return None, f"{shown} not found: no DGR rows"
    r = json.loads(path.read_text())
    theirs = r.get("config", {})
    fields = ("test_per_class", "train_per_class", "sizes", "runs", "classifiers", "eps", "attack_steps", "seed")
    ours = json.loads(json.dumps({f: getattr(cfg, f) for f in fields}))
    diff = {f: (theirs.get(f), ours[f]) for f in fields if theirs.get(f) != ours[f]}
    if diff:
        return None, f"{shown} was made with another protocol (theirs, ours): {diff}"
    return r["detection"], f"`{shown}` (targeted derangement attack, table 'detection')"


def analyse(model, cfg: AnalysisConfig, out, log=print) -> dict:
    """Table 4, Fig. 3 and Fig. 7 of the decoupled ``model`` into ``out`` (cached stages, module doc).

    Returns ``{"table4": ..., "fig3": ..., "fig7": ...}``, each also ``OUT/<stage>.json``.
    """
    from jaxroute.analysis import (class_mean_paths, derangement, embed_paths, layer_clustering_scores,
                                   layer_correlations, layer_fractions, plot_embeddings, plot_layer_profiles,
                                   split_layers)
    from jaxroute.attacks import BIMConfig, cached_attack_dataset
    from jaxroute.decoupling.model import dataset_paths
    from jaxroute.detection import evaluate_protocol
    from jaxroute.models.gates import GateSpec
    from jaxroute.utils.cache import cached_npz, check_cache_config
    from jaxroute.utils.io import compact_png

    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    check_cache_config(cache, cfg.cache_key())
    test, train = analysis_sets(cfg)
    names = list(test.class_names)
    for c in (cfg.source, cfg.target):
        if c not in names:
            raise ValueError(f"class {c!r} is not one of {names}")
    k, spec = len(names), model.spec
    perm = derangement(k, cfg.seed)
    attack = BIMConfig(eps=cfg.eps, steps=cfg.attack_steps)

    def adversarials(name, images, labels, targets, orig_index=None):
        return cached_attack_dataset(model.logits, cache / "adv", name, images, labels, attack="bim", config=attack,
                                     targets=np.asarray(targets), orig_index=orig_index, class_names=names,
                                     batch_size=cfg.batch_size, log=log)

    def paths_of(name, images):
        return cached_npz(cache / "paths" / f"{name}.npz", lambda: dataset_paths(model, images, cfg.batch_size))

    def attack_stats(a, real, adv):
        return {"n": int(len(a["labels"])), "success_rate": float(a["success"].mean()),
                "mean_linf": float(a["linf"].mean()), "mean_l2": float(a["l2"].mean()),
                "clean_top1": float(np.mean(real["pred"] == a["labels"])),
                "adv_top1": float(np.mean(adv["pred"] == a["labels"])),
                "path_flips": float(np.mean(real["paths"] != adv["paths"]))}

    def table4():
        sets, stats = {}, {}
        for split, ds in (("test", test), ("train", train)):
            a = adversarials(f"{split}_perm", ds.images, ds.labels, perm[ds.labels])
            sets[f"{split}_real"] = paths_of(f"{split}_real", ds.images)
            sets[f"{split}_adv"] = paths_of(f"{split}_perm", a["images"])
            stats[split] = attack_stats(a, sets[f"{split}_real"], sets[f"{split}_adv"])
            log(f"{split}: targeted I-FGSM success {stats[split]['success_rate']:.3f}, gates flipped "
                f"{stats[split]['path_flips']:.4f}")
        rows = {}
        for feat, key in (("path", "paths"), ("features", "features")):
            f = lambda name: sets[name][key].reshape(len(sets[name][key]), -1).astype(np.float32)  # noqa: E731
            rows[feat] = evaluate_protocol(f("train_real"), f("train_adv"), train.labels, f("test_real"),
                                           f("test_adv"), sizes=cfg.sizes, runs=cfg.runs,
                                           classifiers=cfg.classifiers, seed=cfg.seed)
            log(f"detection on {feat} done")
        dgr, note = dgr_rows(cfg.cdrp_report, cfg)
        return {"target_permutation": {names[i]: names[int(p)] for i, p in enumerate(perm)}, "attacks": stats,
                "detection": rows, "dgr": dgr, "dgr_source": note}

    def fig3():
        real = paths_of("test_real", test.images)
        paths, labels = real["paths"].astype(np.float64), np.asarray(test.labels)
        xy = embed_paths(paths, pca_dims=cfg.pca_dims, seed=cfg.seed)
        plot_embeddings({"whole calculation path": xy}, labels, names, out / "fig3_paths_tsne.png",
                        f"t-SNE of {len(labels)} test images' calculation paths (PCA to "
                        f"{min(cfg.pca_dims, *paths.shape)} dims first)", cols=1, panel=9.5, dpi=80)
        compact_png(out / "fig3_paths_tsne.png")
        whole = layer_clustering_scores(paths, labels, GateSpec(("all layers",), (spec.size,)), seed=cfg.seed,
                                        n_clusters=k)[0]
        return {"n": int(len(labels)), "dims": int(spec.size), "pca_dims": int(min(cfg.pca_dims, *paths.shape)),
                "distinct_paths": int(len(np.unique(real["paths"], axis=0))),
                "top1": float(np.mean(real["pred"] == labels)),
                **{key: float(v) for key, v in whole.items() if key not in ("layer", "channels")}}

    def fig7():
        s, t = names.index(cfg.source), names.index(cfg.target)
        real = paths_of("test_real", test.images)
        idx = np.flatnonzero(test.labels == s)
        a = adversarials(f"fig7_{cfg.source}_{cfg.target}", test.images[idx], test.labels[idx],
                         np.full(len(idx), t), orig_index=idx)
        correct = a["clean_pred"] == s
        # the first image the network gets right whose attack worked; failing that, the first whose attack worked
        ok = a["success"] & correct if (a["success"] & correct).any() else a["success"]
        means = class_mean_paths(real["paths"].astype(np.float64), test.labels, k)
        fr_means = layer_fractions(means[[s, t]], spec)
        res = {"source": cfg.source, "target": cfg.target, "attacked": int(len(idx)),
               "succeeded": int(a["success"].sum()), "succeeded_clean_correct": int((a["success"] & correct).sum()),
               "layers": list(spec.names),
               "fraction_on": {f"mean {cfg.source}": fr_means[0].tolist(),
                               f"mean {cfg.target}": fr_means[1].tolist()}}
        if not ok.any():
            res["chosen"] = None
            return res
        j = int(np.flatnonzero(ok)[0])
        i = int(idx[j])
        orig = real["paths"][i:i + 1].astype(np.float64)
        adv = dataset_paths(model, a["images"][j:j + 1])["paths"].astype(np.float64)
        fr = layer_fractions(np.concatenate([orig, adv]), spec)
        corr = layer_correlations(adv, orig, np.array([t]), means, spec, source=np.array([s]))
        ref = layer_correlations(orig, orig, np.array([s]), means, spec)["to_reached_class"]
        res["chosen"] = {"test_index": i, "linf": float(a["linf"][j]), "adv_pred": names[int(a["adv_pred"][j])],
                         "gates_flipped": int(np.sum(orig != adv)), "gates": int(spec.size),
                         "clean_pred": names[int(a["clean_pred"][j])]}
        res["fraction_on"] = {f"{cfg.source} image": fr[0].tolist(), "adversarial": fr[1].tolist(),
                              **res["fraction_on"]}
        # Pearson r is undefined where either side's layer is constant (every filter on, say):
        # None (a gap in the figure, n/a in the table), not rowwise_corr's 0
        flat = lambda v: [np.ptp(u) == 0 for u in split_layers(np.reshape(v, (1, -1)), spec).values()]  # noqa: E731

        def defined(r, a, b):
            return [None if fa or fb else float(x) for x, fa, fb in zip(r, flat(a), flat(b))]

        res["correlation"] = {
            f"adversarial vs mean {cfg.source}": defined(corr["to_source_class"][0], adv, means[s]),
            f"adversarial vs mean {cfg.target}": defined(corr["to_reached_class"][0], adv, means[t]),
            f"{cfg.source} image vs mean {cfg.source}": defined(ref[0], orig, means[s])}
        plot_layer_profiles({"fraction of filters on": res["fraction_on"], "Pearson r of the layer's z": res[
            "correlation"]}, spec.names, out / f"fig7_{cfg.source}_{cfg.target}.png",
            f"{cfg.source} -> {cfg.target}: test image {i}, targeted I-FGSM (eps {cfg.eps}, {cfg.attack_steps} steps)",
            images={f"{cfg.source} (test {i})": test.images[i], f"adversarial -> {names[int(a['adv_pred'][j])]}":
                    a["images"][j]})
        compact_png(out / f"fig7_{cfg.source}_{cfg.target}.png")
        return res

    return {"table4": _stage(out, "table4", table4), "fig3": _stage(out, "fig3", fig3),
            "fig7": _stage(out, "fig7", fig7)}


def analysis_lines(res: dict, cfg: AnalysisConfig) -> list[str]:
    """The README sections of :func:`analyse`'s results."""
    from jaxroute.detection.plots import CLASSIFIER_LABELS

    t4, f3, f7 = res["table4"], res["fig3"], res["fig7"]
    clfs = list(cfg.classifiers)
    L = ["", "## Adversarial detection on calculation paths (Table 4)", "",
         f"Test set: the first {cfg.test_per_class} test images per class; training pool: the first "
         f"{cfg.train_per_class} train images per class (as `reports/cdrp`). Targeted I-FGSM (DGR paper Eq. 6, step "
         f"{cfg.eps}, {cfg.attack_steps} steps, no eps-ball) against the decoupled network in eval mode (z held as "
         "computed in each forward), targets one seeded class derangement ("
         + ", ".join(f"{a}->{b}" for a, b in t4["target_permutation"].items()) + "). "
         f"Detectors trained on {', '.join(map(str, cfg.sizes))} images per class with their adversarial twins, "
         f"{cfg.runs} runs, AUC mean ± std.", "",
         "| set | images | attack success | mean L-inf | top-1 clean -> adversarial | gates flipped |",
         "|---|---:|---:|---:|---:|---:|"]
    for split, a in t4["attacks"].items():
        L.append(f"| {split} | {a['n']} | {100 * a['success_rate']:.1f}% | {a['mean_linf']:.4f} | "
                 f"{100 * a['clean_top1']:.1f}% -> {100 * a['adv_top1']:.1f}% | {100 * a['path_flips']:.2f}% |")
    feats = {"path": "calculation path (decoupled net)", "features": "penultimate features (decoupled net)"}
    tables = {k: t4["detection"][k] for k in feats}
    if t4["dgr"]:
        feats.update({"dgr_cdrp": "DGR CDRP (plain net)", "dgr_features": "penultimate features (plain net)"})
        tables.update({"dgr_cdrp": t4["dgr"]["cdrp"], "dgr_features": t4["dgr"]["features"]})
    L += ["", "| images/class | feature | " + " | ".join(CLASSIFIER_LABELS.get(c, c) for c in clfs) + " |",
          "|---:|---|" + "---:|" * len(clfs)]
    for size in cfg.sizes:
        for key, label in feats.items():
            cells = []
            for c in clfs:
                row = next((x for x in tables[key] if x["per_class"] == size and x["classifier"] == c), None)
                cells.append(f"{row['auc_mean']:.4f} ± {row['auc_std']:.4f}" if row else "-")
            L.append(f"| {size} | {label} | " + " | ".join(cells) + " |")
    L += ["", f"DGR rows: {t4['dgr_source']}."
          + (" Those adversarials were crafted against the plain network (the same targets and attack), these "
             "against the decoupled one: the comparison is across attacks on two different networks." if t4["dgr"]
             else ""), "",
          "## Calculation paths of the test set (Fig. 3)", "",
          f"{f3['n']} test images, {f3['dims']} gates each, {f3['distinct_paths']} distinct paths; decoupled top-1 "
          f"{100 * f3['top1']:.1f}%. K-means (K = number of classes) on the whole paths against the classes: "
          f"homogeneity {f3['kmeans_homogeneity']:.3f}, completeness {f3['kmeans_completeness']:.3f}, V-measure "
          f"{f3['kmeans_v_measure']:.3f} (agglomerative: V-measure {f3['agglomerative_v_measure']:.3f}).", "",
          "![t-SNE of calculation paths](fig3_paths_tsne.png)", "",
          f"## One attack's path: {f7['source']} -> {f7['target']} (Fig. 7)", ""]
    if f7["chosen"] is None:
        L.append(f"No attack of the {f7['attacked']} {f7['source']} test images reached {f7['target']}: no figure.")
        return L
    ch = f7["chosen"]
    names = f7["layers"]
    pick = sorted({0, len(names) // 2, len(names) - 1})
    right = ch["clean_pred"] == f7["source"]
    L += [f"Test image {ch['test_index']}, the first of the {f7['attacked']} {f7['source']} test images "
          + ("classified correctly " if right else "") + f"whose attack reached {f7['target']} "
          f"({f7['succeeded_clean_correct']} classified correctly and attacked successfully, {f7['succeeded']} "
          "attacked successfully)"
          + ("" if right else f"; none was both, so this one is misclassified clean (as {ch['clean_pred']})")
          + f"; L-inf {ch['linf']:.3f}, "
          f"{ch['gates_flipped']} of {ch['gates']} gates flipped.", "",
          "| per layer | " + " | ".join(names[i] for i in pick) + " | mean over layers |",
          "|---|" + "---:|" * (len(pick) + 1)]
    for what in ("fraction_on", "correlation"):
        for label, v in f7[what].items():
            known = [x for x in v if x is not None]
            L.append(f"| {'on: ' if what == 'fraction_on' else 'r: '}{label} | "
                     + " | ".join("n/a" if v[i] is None else f"{v[i]:.3f}" for i in pick)
                     + (f" | {np.mean(known):.3f} |" if known else " | n/a |"))
    L += ["", "r n/a: the layer's z (or the class mean) is constant there, so the correlation is undefined; "
          "the mean is over the other layers.",
          "", f"![{f7['source']} -> {f7['target']}](fig7_{f7['source']}_{f7['target']}.png)"]
    return L


def main(argv=None) -> int:
    d = AnalysisConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default=str(SHARED / "models/cifar10-resnet/resnet20-12fca82f.th"))
    ap.add_argument("--data", default=d.data)
    ap.add_argument("--limit", type=int, default=None,
                    help="first N train and test images for training and Table 2 (smoke runs); the analyses "
                         "always use the first --test-per-class / --train-per-class images per class")
    ap.add_argument("--frozen-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12, help="joint epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--test-per-class", type=int, default=d.test_per_class)
    ap.add_argument("--train-per-class", type=int, default=d.train_per_class)
    ap.add_argument("--sizes", default=",".join(map(str, d.sizes)), help="detector training images per class")
    ap.add_argument("--runs", type=int, default=d.runs)
    ap.add_argument("--classifiers", default=",".join(d.classifiers))
    ap.add_argument("--eps", type=float, default=d.eps)
    ap.add_argument("--attack-steps", type=int, default=d.attack_steps)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--source", default=d.source, help="Fig. 7: the attacked class")
    ap.add_argument("--target", default=d.target, help="Fig. 7: the attack's target class")
    ap.add_argument("--cdrp-report", default=d.cdrp_report, help="the CDRP experiment's cdrp.json (DGR rows)")
    args = ap.parse_args(argv)
    try:
        acfg = AnalysisConfig(data=args.data, test_per_class=args.test_per_class, train_per_class=args.train_per_class,
                              sizes=tuple(int(v) for v in comma_list(args.sizes)), runs=args.runs,
                              classifiers=comma_list(args.classifiers), eps=args.eps, attack_steps=args.attack_steps,
                              seed=args.seed, batch_size=args.batch_size, source=args.source, target=args.target,
                              cdrp_report=args.cdrp_report)
    except ValueError as e:
        ap.error(str(e))

    import jax

    from jaxroute.data import load_dataset
    from jaxroute.decoupling.model import calculation_paths, decoupled_model, save_decoupled
    from jaxroute.decoupling.train import DecoupleConfig, evaluate, train_decoupled
    from jaxroute.training import TrainConfig, fit
    from jaxroute.training.train import eval_logits, topk_accuracy
    from jaxroute.utils.io import atomic_write_text
    from jaxroute.weights import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset(args.data, "train", limit=args.limit)
    test = load_dataset(args.data, "test", limit=args.limit)
    cfg = DecoupleConfig(epochs=args.frozen_epochs + args.epochs, freeze_backbone_epochs=args.frozen_epochs,
                         batch_size=args.batch_size, lr=0.1, joint_lr=0.01)

    def decoupled():
        model = decoupled_model("resnet20", args.weights, key=jax.random.key(0))
        variables, history = train_decoupled(model, train, out / "decoupled", cfg, log=print)
        model = model.with_variables(variables)
        save_decoupled(out / "decoupled", model, overwrite=True)
        res = evaluate(model, test)
        z = {}
        for i in range(0, len(test.labels), 256):
            for p, v in calculation_paths(model, test.images[i:i + 256]).items():
                z.setdefault(p, []).append(np.asarray(v))
        res["v_measure"] = v_measures({p: np.concatenate(v) for p, v in z.items()}, np.asarray(test.labels))
        res["history"] = history
        return res

    def control():
        plain = load_model("resnet20", args.weights)
        before = topk_accuracy(eval_logits(plain, test), np.asarray(test.labels))
        tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01, weight_decay=1e-4,
                         flip=True, pad_crop=4)
        tuned = plain.with_variables(fit(plain, train, tc, progress=False, log=print))
        after = topk_accuracy(eval_logits(tuned, test), np.asarray(test.labels))
        return {"pretrained": before, "fine_tuned": after}

    dec = _stage(out, "decoupled", decoupled)
    ctl = _stage(out, "control", control)
    speed = None
    if not args.no_speed:
        from benchmarks.decoupling import main as bench

        speed = _stage(out, "speed", lambda: bench(["--weights", str(out / "decoupled"), "--data", args.data,
                                                    "--backbone", args.weights, "--out", str(out / "speed_raw.json")]
                                                   + (["--quick"] if args.limit else [])))
    lines = ["# Network decoupling, CIFAR-10 ResNet-20", "",
             "| model | top-1 | top-5 | MACs (M) |", "| --- | --- | --- | --- |",
             f"| pretrained | {ctl['pretrained']['top1']:.4f} | {ctl['pretrained']['top5']:.4f} | "
             f"{dec['macs_dense'] / 1e6:.2f} |",
             f"| control (fine-tuned, CE) | {ctl['fine_tuned']['top1']:.4f} | {ctl['fine_tuned']['top5']:.4f} | "
             f"{dec['macs_dense'] / 1e6:.2f} |",
             f"| decoupled | {dec['test_top1']:.4f} | {dec['test_top5']:.4f} | {dec['macs_mean'] / 1e6:.2f} "
             f"({dec['macs_reduction']:.2f}x fewer) |", "",
             "## Filters per layer (Fig. 4)", "", "| layer | energetic | silent | dynamic | V-measure |",
             "| --- | --- | --- | --- | --- |"]
    for p, d in dec["filter_states"]["per_layer"].items():
        lines.append(f"| {p} | {d['energetic']} | {d['silent']} | {d['dynamic']} | {dec['v_measure'][p]:.3f} |")
    if speed:
        lines += ["", "## Single-thread speed, batch 1 (median ms)", "",
                  " | ".join(f"{k} {v:.2f}" for k, v in speed["median_ms_b1"].items()),
                  f"gathered vs dense {speed['speedup_gathered_vs_dense']:.2f}x, MAC ratio {speed['mac_ratio']:.2f}x"]
    model = decoupled_model(None, out / "decoupled", key=jax.random.key(0))
    lines += analysis_lines(analyse(model, acfg, out, log=print), acfg)
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
