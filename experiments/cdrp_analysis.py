"""Reproduce the DGR paper's CDRP analyses (Sec. 4.2-4.3) on CIFAR-10 with the pretrained ResNet-20.

    python -m experiments.cdrp_analysis --out reports/cdrp

Wang et al., "Interpret Neural Networks by Identifying Critical Data Routing
Paths", CVPR 2018.  One command regenerates, into ``OUT``:

* per-layer semantics (Fig. 4, Fig. 5): t-SNE of every gate layer's gates of
  the real test images, coloured by class (``layers_tsne.png``); K-means and
  agglomerative clustering per layer with homogeneity / completeness /
  V-measure (``layer_scores.png``);
* intra-class clustering (Fig. 6, 7): agglomerative clustering of whole CDRPs
  within each class, one image grid per class (``intra_<class>.png``);
* CDRP divergence under attack (Fig. 8): untargeted and targeted I-FGSM
  (DGR paper Eqs. 5/6, eps 0.01, 10 steps); layer-wise correlation of the
  adversarial image's gates with its original image's gates and with the
  mean path of real images of the class it reached, for a random target
  permutation and for a semantically close and a distant class pair chosen
  by WordNet path length (``divergence.png``);
* adversarial detection (Eq. 4, Table 3, scaled to CIFAR-10): random forest,
  AdaBoost and gradient boosting on CDRPs of real vs targeted-adversarial
  images (targets: a random derangement of the classes), training sets of
  10 / 50 / 100 images per class drawn from a train-split pool, a fixed test
  set of 100 images per class, 5 runs, AUC from predicted probabilities,
  mean ± std; the same classifiers on the penultimate activations as the
  baseline (``detection.png``);
* ``cdrp.md`` (tables and notes) and ``cdrp.json`` (every number).

Cache and resume.  Adversarial images (``cache/adv/<set>.npz``, the routable
format ``jaxroute attack`` writes; :func:`jaxroute.attacks.cached_attack_dataset`)
and routed CDRPs (``cache/route/<set>/``, the shards ``jaxroute route`` writes)
are written atomically; a killed run
started again with the same arguments reuses every finished file and shard.
Detection results are cached too (``cache/detect-<feature>.json``).  A cache
written with other arguments is refused (``cache/config.json``).
``cache/`` is git-ignored; ``jaxroute detect --train-real
OUT/cache/route/train_real --train-adv OUT/cache/route/train_perm
--test-real OUT/cache/route/test_real --test-adv OUT/cache/route/test_perm``
re-runs the detection table from it.

Seeds: ``--seed`` fixes the target derangement, the detection draws and the
classifiers' seeds (t-SNE and K-means use it too).  Attacks and DGR are
deterministic given their inputs.

Deviations from the paper (also listed in the report, ``DEVIATIONS``):
CIFAR-10 / ResNet-20 instead of ImageNet / VGG-16; Table 3 scaled to 10
classes (10/50/100 training images per class from a 200/class pool, 100/class
test images) with AUC from probabilities; one seeded class derangement as
the targets; in Fig. 8 a class's path is the mean CDRP of its correctly
classified train-pool images.  Added (not in the paper): the penultimate
baseline, an eps-ball-bounded attack, a transfer test on untargeted
adversarials, training-free one-number scores, dense-path statistics.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from jaxroute.analysis import (
    attack_correlations, centroid_distance, choose_pairs, class_paths_from, cluster_class, cluster_summary, dense,
    depth_trend, derangement, embed_layers, layer_clustering_scores, layer_correlations, neighbour_fraction,
    load_first_per_class, path_stats, wordnet_distances,
)
from jaxroute.analysis.plots import plot_clusters, plot_correlations, plot_embeddings, plot_layer_scores
from jaxroute.detection import evaluate_protocol, scalar_aucs
from jaxroute.detection.plots import CLASSIFIER_LABELS, FEATURE_LABELS, plot_detection
from jaxroute.models.gates import GateSpec
from jaxroute.utils.cache import Timings, check_cache_config
from jaxroute.utils.io import atomic_write_json, atomic_write_text, compact_png

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # default data: ../shared beside the repository
CACHED_STAGES = ("attack", "route", "detection")  # timed stages whose results the cache keeps


@dataclasses.dataclass(frozen=True)
class Config:
    weights: str = str(SHARED / "models/cifar10-resnet/resnet20-12fca82f.th")
    data: str = str(SHARED / "data/cifar10-jpeg")
    wordnet: str = str(SHARED / "data/wordnet")
    test_per_class: int = 100     # fixed test set (first N per class of the test split)
    train_per_class: int = 200    # detector training pool (first N per class of the train split)
    sizes: tuple = (10, 50, 100)  # detector training images per class
    runs: int = 5
    classifiers: tuple = ("random_forest", "adaboost", "gradient_boosting")
    eps: float = 0.01             # I-FGSM step (DGR paper Eqs. 5/6)
    attack_steps: int = 10
    dgr_steps: int = 30
    batch_size: int = 32          # per device
    seed: int = 0
    clusters: int = 4             # intra-class clusters
    per_cluster: int = 12         # images shown per cluster row
    bounded: bool = True          # also detect an eps-ball-bounded targeted I-FGSM (step eps/steps)
    official_scale: bool = True   # also the official code's scale: step eps on the normalised input
    carried_momentum: bool = True  # also route those adversarials with the real twin's SGD momentum
    close_pair: tuple | None = None    # (source, target) class names; default: WordNet-closest
    distant_pair: tuple | None = None  # default: WordNet-farthest

    # fields that determine the cached adversarial images and routed CDRPs
    CACHE_FIELDS = ("weights", "data", "test_per_class", "train_per_class", "eps", "attack_steps",
                    "dgr_steps", "batch_size", "seed")

    def __post_init__(self):
        for f in ("test_per_class", "train_per_class", "runs", "attack_steps", "dgr_steps", "batch_size", "clusters"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if max(self.sizes) > self.train_per_class:
            raise ValueError(f"the largest training size ({max(self.sizes)}/class) exceeds the training pool "
                             f"({self.train_per_class}/class)")
        if self.test_per_class < self.clusters:
            raise ValueError(f"need at least {self.clusters} test images per class for {self.clusters} clusters")

    def cache_key(self) -> dict:
        return {f: getattr(self, f) for f in self.CACHE_FIELDS}


# --------------------------------------------------------------------------- attacks and routing
def route_cached(model, images, labels, class_names, out_dir: Path, cfg: Config, data: str, split: str,
                 limit: int | None, log, momentum_from=None) -> tuple[dict[str, np.ndarray], dict]:
    """DGR-route a set through the resumable extraction job (shards under ``out_dir``)."""
    import jax

    from jaxroute.data import Dataset
    from jaxroute.extraction import load_shards, plan_batches
    from jaxroute.routing import DGRConfig, route_dataset

    ds = Dataset(np.asarray(images, np.float32), np.asarray(labels, np.int32), tuple(class_names), split)
    plan = plan_batches(len(ds.images), cfg.batch_size, cfg.batch_size * jax.local_device_count() * 4)
    summary = route_dataset(model, ds, out_dir, plan=plan, config=DGRConfig(steps=cfg.dgr_steps),
                            source={"weights": cfg.weights, "data": data, "split": split, "limit": limit},
                            progress=False, momentum_from=momentum_from, log=log)
    return load_shards(out_dir), summary


def analyse_layers(real: dict, spec, class_names, out: Path, seed: int, tsne: bool = True) -> dict:
    """Fig. 4 / Fig. 5: per-layer clustering scores (true labels; V-measure also vs predictions)
    and t-SNE of every layer's gates; whole-CDRP scores as a reference row."""
    cdrp, labels, pred = real["cdrp"], real["label"], real["pred"]
    rows = layer_clustering_scores(cdrp, labels, spec, seed=seed, other_labels={"pred": pred})
    keep = ~dense(real)  # the scores once more without the dense paths
    enough = len(np.unique(labels[keep])) == len(np.unique(labels)) and keep.sum() > 2 * len(np.unique(labels))
    if enough:
        for row, r2 in zip(rows, layer_clustering_scores(cdrp[keep], labels[keep], spec, seed=seed)):
            row["kmeans_v_measure_without_dense"] = r2["kmeans_v_measure"]
    whole_spec = GateSpec(("all layers",), (spec.size,))
    whole = layer_clustering_scores(cdrp, labels, whole_spec, seed=seed, other_labels={"pred": pred})[0]
    if enough:
        whole["kmeans_v_measure_without_dense"] = layer_clustering_scores(cdrp[keep], labels[keep], whole_spec,
                                                                          seed=seed)[0]["kmeans_v_measure"]
    inner = np.array([r["layer"].endswith(".conv1") for r in rows])  # ResNet: gates inside a residual block
    trend = depth_trend(rows, ("kmeans_v_measure", "agglomerative_v_measure", "kmeans_v_measure_pred",
                               "kmeans_v_measure_without_dense")[:4 if enough else 3],
                        {"all layers": np.ones(len(rows), bool), "block outputs": ~inner, "inside blocks": inner})
    plot_layer_scores(rows, out / "layer_scores.png",
                      f"ResNet-20 / CIFAR-10: clustering of each layer's gates ({len(labels)} test images, K=10)",
                      dpi=90)
    res = {"rows": rows, "all_layers": whole, "depth_trend": trend, "n": int(len(labels)),
           "n_without_dense": int(keep.sum())}
    if tsne:
        t0 = time.perf_counter()
        emb = embed_layers(cdrp, spec, method="tsne", seed=seed)
        # are the dense paths one group in the embedding? (vs the dense fraction overall)
        dense_nn = ({name: neighbour_fraction(xy, ~keep) for name, xy in emb.items()}
                    if (~keep).any() and keep.any() else None)
        plot_embeddings(emb, labels, class_names, out / "layers_tsne.png",
                        f"t-SNE of each gate layer's gates ({len(labels)} real test images, coloured by true class)",
                        cols=5, panel=2.3, dpi=80)
        res["tsne_seconds"] = time.perf_counter() - t0
        res["tsne_dense_neighbour_fraction"] = dense_nn
    try:
        import umap  # noqa: F401
        res["umap"] = "installed but not run (t-SNE only)"
    except ImportError:
        res["umap"] = "umap-learn not installed: UMAP embeddings skipped"
    return res


def analyse_intra(sets: list[tuple[dict, np.ndarray]], class_names, out: Path, clusters: int,
                  per_cluster: int) -> list[dict]:
    """Fig. 6 / 7: per class, agglomerative (Ward) clusters of whole CDRPs of its real images,
    one image grid per class (most typical first, misclassified images framed red)."""
    cdrp = np.concatenate([s["cdrp"] for s, _ in sets])
    labels = np.concatenate([s["label"] for s, _ in sets])
    pred = np.concatenate([s["pred"] for s, _ in sets])
    images = np.concatenate([im for _, im in sets])
    res = []
    for k, name in enumerate(class_names):
        sel = np.flatnonzero(labels == k)
        if len(sel) < clusters:
            continue
        ids = cluster_class(cdrp[sel], clusters)
        correct = pred[sel] == k
        summ = cluster_summary(ids, correct)
        dn, spars = np.all(cdrp[sel] > 0, 1), np.mean(cdrp[sel] > 0, 1)
        for row in summ:
            m = ids == row["cluster"]
            row.update(dense_fraction=float(dn[m].mean()), sparsity=float(spars[m].mean()),
                       max_gate=float(cdrp[sel][m].max()))
        for row in summ:  # what the misclassified members were taken for
            wrong = pred[sel][(ids == row["cluster"]) & ~correct]
            row["predicted_as"] = {class_names[int(c)]: int(n) for c, n in
                                   zip(*np.unique(wrong, return_counts=True))}
        notes = [f"acc {r['accuracy']:.2f}" for r in summ]
        plot_clusters(images[sel], ids, out / f"intra_{name}.png", per_cluster=per_cluster,
                      title=f"{name}: {len(sel)} real images, {clusters} agglomerative clusters of whole CDRPs "
                            "(most typical first; red frame = misclassified)",
                      order=centroid_distance(cdrp[sel], ids), mark=~correct, row_notes=notes, dpi=80)
        res.append({"class": name, "n": int(len(sel)), "accuracy": float(correct.mean()), "clusters": summ})
    return res


def analyse_divergence(settings: dict, reference: np.ndarray, spec, out: Path, title: str) -> dict:
    """Fig. 8: plot each setting's ``attack_correlations`` and keep their per-layer mean / std."""
    shown = {k: v["corr"] for k, v in settings.items() if v["n"] > 0}
    if shown:
        plot_correlations(shown, spec, out / "divergence.png", title, reference=reference)
    res = {"reference_real_to_own_class": reference.mean(0).tolist(), "settings": {}}
    for name, v in settings.items():
        r = {"n": v["n"], "n_total": v["n_total"], "n_worked": v["n_worked"]}
        if v["n"]:
            r.update({k: {"mean": a.mean(0).tolist(), "std": a.std(0).tolist()} for k, a in v["corr"].items()})
        res["settings"][name] = r
    return res


def analyse_detection(parts: dict, cfg: Config, cache: Path, log, adv: str = "perm",
                      extra: dict | None = None, timings: "Timings | None" = None) -> dict:
    """Table 3 (scaled): detectors on CDRPs and, as the baseline, on penultimate activations.

    ``parts`` holds the routed sets ``train_real``, ``train_<adv>``, ``test_real``, ``test_<adv>``;
    ``extra`` ({name: (real set, adversarial set)}) are further test sets for the same detectors.
    """
    res = {}
    for feat in FEATURE_LABELS:
        path = cache / f"detect-{adv}-{feat}.json"
        key = {"sizes": list(cfg.sizes), "runs": cfg.runs, "classifiers": list(cfg.classifiers), "seed": cfg.seed,
               "extra": sorted(extra or {})}
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                res[feat] = saved["rows"]
                continue
        t0 = time.perf_counter()
        f = lambda d: d[feat].reshape(len(d[feat]), -1)  # noqa: E731
        rows = evaluate_protocol(f(parts["train_real"]), f(parts[f"train_{adv}"]), parts["train_real"]["label"],
                                 f(parts["test_real"]), f(parts[f"test_{adv}"]), sizes=cfg.sizes, runs=cfg.runs,
                                 classifiers=cfg.classifiers, seed=cfg.seed,
                                 extra_tests={k: (f(r), f(a)) for k, (r, a) in (extra or {}).items()})
        log(f"detection ({adv}) on {feat}: {time.perf_counter() - t0:.0f} s")
        if timings is not None:
            timings.add("detection", time.perf_counter() - t0)
        atomic_write_json(path, {"key": key, "rows": rows})
        res[feat] = rows
    return res


# --------------------------------------------------------------------------- the whole experiment
def run(cfg: Config, out, log: Callable[[str], object] = print, tsne: bool = True) -> dict:
    """Everything, into ``out``; returns the dict also written to ``out/cdrp.json``."""
    import jax

    from jaxroute.attacks import BIMConfig, cached_attack_dataset
    from jaxroute.weights import load_model

    t_start = time.perf_counter()
    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    check_cache_config(cache, cfg.cache_key())
    timings = Timings(cache / "timings.json", CACHED_STAGES)
    ndev = jax.local_device_count()
    global_batch = cfg.batch_size * ndev

    model = load_model("resnet20", cfg.weights)
    spec = model.spec
    test = load_first_per_class(cfg.data, "test", cfg.test_per_class)
    train = load_first_per_class(cfg.data, "train", cfg.train_per_class)
    names = list(test.class_names)
    k = len(names)

    dist, wnids, lch = wordnet_distances(cfg.wordnet, names)
    close, distant = choose_pairs(dist)
    for given, attr in ((cfg.close_pair, "close_pair"), (cfg.distant_pair, "distant_pair")):
        if given:
            if len(given) != 2 or any(c not in names for c in given) or given[0] == given[1]:
                raise ValueError(f"{attr} must be two different class names out of {names}, got {given}")
            if attr == "close_pair":
                close = (names.index(given[0]), names.index(given[1]))
            else:
                distant = (names.index(given[0]), names.index(given[1]))
    perm = derangement(k, cfg.seed)
    log(f"classes {names}; target permutation {[names[int(p)] for p in perm]}; close pair "
        f"{names[close[0]]}->{names[close[1]]} (path {dist[close]}), distant {names[distant[0]]}->{names[distant[1]]} "
        f"(path {dist[distant]}); {ndev} device(s), global batch {global_batch}")

    adv_dir = cache / "adv"
    unbounded = BIMConfig(eps=cfg.eps, steps=cfg.attack_steps)

    def adv_set(name, images, labels, target, orig_index, config=unbounded):
        fresh, t0 = not (adv_dir / f"{name}.npz").exists(), time.perf_counter()
        a = cached_attack_dataset(model.logits, adv_dir, name, images, labels, attack="bim", config=config,
                                  targets="none" if target is None else target, orig_index=orig_index,
                                  class_names=names, batch_size=global_batch, log=log)
        if fresh:  # the cache keeps the attack's cost, not the cost of reading it back
            timings.add("attack", time.perf_counter() - t0)
        return a

    routed, summaries = {}, {}

    def route(name, images, labels, data, split, limit, momentum_from=None):
        t0 = time.perf_counter()
        routed[name], summaries[name] = route_cached(model, images, labels, names, cache / "route" / name, cfg,
                                                     data, split, limit, log, momentum_from)
        timings.add("route", time.perf_counter() - t0)
        s = summaries[name]
        log(f"routed {name}: {s['n']} images, top-1 agreement {s['top1_agreement']:.4f}, "
            f"sparsity {s['sparsity']:.4f}")

    # real images
    route("test_real", test.images, test.labels, cfg.data, "test", 10 * cfg.test_per_class)
    # targeted I-FGSM, targets from the class derangement: detection test set and Fig. 8
    advs = {}
    advs["test_perm"] = adv_set("test_perm", test.images, test.labels, perm[test.labels], np.arange(len(test.labels)))
    route("test_perm", advs["test_perm"]["images"], test.labels, str(adv_dir), "test_perm", None)
    # untargeted I-FGSM (true labels): Fig. 8 and a transfer test for the detectors
    advs["test_untargeted"] = adv_set("test_untargeted", test.images, test.labels, None, np.arange(len(test.labels)))
    route("test_untargeted", advs["test_untargeted"]["images"], test.labels, str(adv_dir), "test_untargeted", None)
    # the semantically close and distant pairs: the source class's test images -> the other class
    for tag, (s, t) in (("pair_close", close), ("pair_distant", distant)):
        idx = np.flatnonzero(test.labels == s)
        advs[tag] = adv_set(tag, test.images[idx], test.labels[idx], np.full(len(idx), t), idx)
        route(tag, advs[tag]["images"], test.labels[idx], str(adv_dir), tag, None)
    # detector training pool
    route("train_real", train.images, train.labels, cfg.data, "train", 10 * cfg.train_per_class)
    advs["train_perm"] = adv_set("train_perm", train.images, train.labels, perm[train.labels],
                                 np.arange(len(train.labels)))
    route("train_perm", advs["train_perm"]["images"], train.labels, str(adv_dir), "train_perm", None)
    variants = []  # (name, attack config, also routed with the real twin's momentum)
    if cfg.bounded:
        # eps-ball-bounded variant (torchattacks BIM semantics): step eps/steps, L-inf <= eps
        variants.append(("bounded", BIMConfig(eps=cfg.eps, steps=cfg.attack_steps, alpha=cfg.eps / cfg.attack_steps),
                         False))
    if cfg.official_scale:
        # the official release's attack: step eps on the ImageNet-normalised input, clamped to the image's own
        # normalised [min, max] (eps * std ~ 0.00226 in pixels per step); the release routes the adversarial
        # right after its real twin with one optimizer, hence the carried-momentum routing
        variants.append(("official", BIMConfig(eps=cfg.eps, steps=cfg.attack_steps,
                                               normalization=(model.meta.mean, model.meta.std)),
                         cfg.carried_momentum))
    for variant, config, carried in variants:
        for split, ds in (("test", test), ("train", train)):
            name = f"{split}_{variant}"
            advs[name] = adv_set(name, ds.images, ds.labels, perm[ds.labels], np.arange(len(ds.labels)),
                                 config=config)
            route(name, advs[name]["images"], ds.labels, str(adv_dir), name, None)
            if carried:
                route(f"{split}_{variant}carried", advs[name]["images"], ds.labels, str(adv_dir), name, None,
                      momentum_from=ds.images)

    # ---- analyses
    t0 = time.perf_counter()
    layers = analyse_layers(routed["test_real"], spec, names, out, cfg.seed, tsne=tsne)
    timings.add("analysis_layers", time.perf_counter() - t0)
    t0 = time.perf_counter()
    intra = analyse_intra([(routed["test_real"], test.images), (routed["train_real"], train.images)], names, out,
                          cfg.clusters, cfg.per_cluster)
    timings.add("analysis_intra", time.perf_counter() - t0)

    t0 = time.perf_counter()
    paths, path_notes = class_paths_from(routed["train_real"], k)
    real = routed["test_real"]
    sub = lambda d, idx: {key: v[idx] for key, v in d.items()}  # noqa: E731
    settings = {
        "untargeted": attack_correlations(routed["test_untargeted"], real, paths, spec, None),
        "targeted, random derangement": attack_correlations(routed["test_perm"], real, paths, spec,
                                                           perm[real["label"]]),
    }
    for tag, (s, t) in (("pair_close", close), ("pair_distant", distant)):
        oi = advs[tag]["orig_index"]
        label = f"targeted {names[s]}->{names[t]} ({'close' if tag == 'pair_close' else 'distant'}, " \
                f"WordNet path {dist[s, t]})"
        settings[label] = attack_correlations(routed[tag], sub(real, oi), paths, spec, np.full(len(oi), t))
    ok_real = (real["pred"] == real["label"]) & ~real["fell_back"]
    reference = layer_correlations(real["cdrp"][ok_real], real["cdrp"][ok_real], real["label"][ok_real], paths,
                                   spec)["to_reached_class"]
    divergence = analyse_divergence(settings, reference, spec, out,
                                    f"Layer-wise correlation of adversarial CDRPs (I-FGSM, eps {cfg.eps}, "
                                    f"{cfg.attack_steps} steps)")
    divergence["class_path_notes"] = path_notes
    timings.add("analysis_divergence", time.perf_counter() - t0)

    t0 = time.perf_counter()
    detection = analyse_detection(routed, cfg, cache, log, "perm",
                                  {"untargeted": (routed["test_real"], routed["test_untargeted"])}, timings)
    dets = {f"targeted I-FGSM, step {cfg.eps}, {cfg.attack_steps} steps (paper)": detection}
    scalars = {"targeted (paper)": scalar_aucs(routed["test_real"], routed["test_perm"]),
               "untargeted (paper)": scalar_aucs(routed["test_real"], routed["test_untargeted"])}
    detection_bounded = None
    if cfg.bounded:
        ok = advs["test_bounded"]["success"]
        detection_bounded = analyse_detection(routed, cfg, cache, log, "bounded",
                                              {"successful_only": (sub(real, ok), sub(routed["test_bounded"], ok))},
                                              timings)
        dets[f"targeted I-FGSM bounded: L-inf <= {cfg.eps}, step {cfg.eps / cfg.attack_steps:g}"] = detection_bounded
        scalars["targeted, bounded"] = scalar_aucs(routed["test_real"], routed["test_bounded"])
    detection_official = detection_carried = None
    if cfg.official_scale:
        detection_official = analyse_detection(routed, cfg, cache, log, "official", None, timings)
        dets[f"targeted I-FGSM, official scale (step {cfg.eps} on the normalised input)"] = detection_official
        scalars["targeted, official scale"] = scalar_aucs(routed["test_real"], routed["test_official"])
        if cfg.carried_momentum:
            detection_carried = analyse_detection(routed, cfg, cache, log, "officialcarried", None, timings)
            dets["official scale, adversarials routed with the real twin's momentum"] = detection_carried
            scalars["official scale, momentum carried"] = scalar_aucs(routed["test_real"],
                                                                      routed["test_officialcarried"])
    plot_detection(dets, out / "detection.png")
    timings.add("plots_and_scores", time.perf_counter() - t0 - timings.now.get("detection", 0.0))
    for png in sorted(out.glob("*.png")):
        compact_png(png)

    attack_stats = {}
    for name, a in advs.items():
        src = routed["train_real"] if name.startswith("train") else sub(real, a["orig_index"])
        attack_stats[name] = {"n": int(len(a["labels"])), "success_rate": float(a["success"].mean()),
                              "mean_linf": float(a["linf"].mean()), "max_linf": float(a["linf"].max()),
                              "mean_l2": float(a["l2"].mean()),
                              "clean_top1": float(np.mean(src["pred"] == a["labels"])),
                              "adv_top1": float(np.mean(a["adv_pred"] == a["labels"]))}
    wall = time.perf_counter() - t_start
    inv_path = cache / "invocations.json"
    invocations = json.loads(inv_path.read_text()) if inv_path.exists() else []
    invocations.append({"wall_s": wall, "stages_s": timings.now,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - wall))})
    atomic_write_json(inv_path, invocations)
    result = {
        "config": dataclasses.asdict(cfg),
        "devices": ndev,
        "class_names": names,
        "wordnet": {"wnids": wnids, "path_length": dist.tolist(), "lowest_common_hypernym": lch,
                    "close_pair": [names[close[0]], names[close[1]]],
                    "distant_pair": [names[distant[0]], names[distant[1]]]},
        "target_permutation": {names[i]: names[int(p)] for i, p in enumerate(perm)},
        "routing": {n: {**{key: s[key] for key in ("n", "full_top1", "top1_accuracy", "top1_agreement", "sparsity",
                                                   "sparsity_std", "fallback_fraction")},
                        **path_stats(routed[n])}
                    for n, s in summaries.items()},
        "attacks": attack_stats,
        "layers": layers,
        "intra_class": intra,
        "divergence": divergence,
        "detection": detection,
        "detection_bounded": detection_bounded,
        "detection_official": detection_official,
        "detection_official_carried": detection_carried,
        "scalar_score_aucs": scalars,
        "runtime": {"this_invocation_s": wall, "stages_this_invocation_s": timings.now,
                    "cached_stages_all_invocations_s": timings.total, "invocations": invocations},
    }
    atomic_write_json(out / "cdrp.json", result)
    atomic_write_text(out / "cdrp.md", render_report(result, spec))
    return result


# --------------------------------------------------------------------------- report
DEVIATIONS = (
    "CIFAR-10 (JPEG re-encodings) and a pretrained ResNet-20 instead of ImageNet and VGG-16 / AlexNet / ResNet-50.",
    "Table 3 protocol scaled to 10 classes: {sizes} training images per class drawn from a fixed pool of "
    "the first {train_per_class} train images per class (so the {runs} runs overlap), a fixed test set of "
    "{test_per_class} test images per class; AUC from the detectors' predicted probabilities (the official "
    "release scored hard labels).",
    "Targets of the targeted attacks: one random derangement of the 10 classes (seeded), the same for the "
    "training pool and the test set.",
    "Fig. 8: 'images of the target class' enter as the mean CDRP of the train-pool images of that class that "
    "the model classifies correctly; only adversarials of correctly classified originals whose attack worked are "
    "used; the 'original class' line and the real-image reference line are added controls.",
    "Fig. 4 / 5: clustering with K = 10 against the true labels (also against the predictions); t-SNE only "
    "(UMAP when umap-learn is installed).",
    "Fig. 6 / 7: Ward-linkage agglomerative clustering of raw whole CDRPs into {clusters} clusters per class over "
    "{class_images} images ({test_per_class} test + {train_per_class} train).",
    "Not in the paper: the penultimate-activation baseline, the eps-ball-bounded attack, the transfer test on "
    "untargeted adversarials, the training-free scores and the dense-path statistics.",
)


def _f(x, d=3):
    return f"{x:.{d}f}"


def render_report(r: dict, spec) -> str:
    cfg, names = r["config"], r["class_names"]
    L = []
    add = L.append
    add("# CDRP analysis and CDRP-based adversarial detection (DGR paper Sec. 3, 4.2, 4.3)")
    add("")
    add(f"Pretrained ResNet-20, CIFAR-10 JPEG images; DGR with T={cfg['dgr_steps']} (lr 0.1, momentum 0.9, "
        f"clip [0, 10], gamma 0.05). Regenerate with `python -m experiments.cdrp_analysis --out reports/cdrp` "
        f"(seed {cfg['seed']}).")
    add("")
    add(f"Data: test set = the first {cfg['test_per_class']} test images per class "
        f"({10 * cfg['test_per_class']}); detector training pool = the first {cfg['train_per_class']} train "
        f"images per class ({10 * cfg['train_per_class']}). Attacks: I-FGSM (DGR paper Eqs. 5/6), step "
        f"eps={cfg['eps']}, {cfg['attack_steps']} steps, no eps-ball projection (L-inf up to "
        f"{cfg['eps'] * cfg['attack_steps']:.2f}), clipped to [0, 1]; untargeted uses the true label.")
    add("")
    rt = r["runtime"]
    add(f"Runtime on {r['devices']} CPU device(s) (2-core machine, shared with other jobs), per invocation "
        "that built this folder (a resumed run reuses cached attacks, routes and detector results):")
    add("")
    for i, inv in enumerate(rt["invocations"], 1):
        add(f"{i}. started {inv['started']}: {inv['wall_s'] / 60:.1f} min ("
            + ", ".join(f"{k} {v / 60:.1f}" for k, v in inv["stages_s"].items()) + " min)")
    add("")
    add("## Routed sets and attacks")
    add("")
    add("| set | images | full-model top-1 (true label) | gated top-1 agreement | sparsity (gates > 0) | "
        "fallback (all ones) | dense paths (all gates > 0) | top-1 on dense / other paths |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, s in r["routing"].items():
        acc = (f"{100 * s['accuracy_dense']:.1f}% / {100 * s['accuracy_not_dense']:.1f}%"
               if s["accuracy_dense"] is not None and s["accuracy_not_dense"] is not None else "-")
        add(f"| {n} | {s['n']} | {100 * s['full_top1']:.2f}% | {100 * s['top1_agreement']:.2f}% | "
            f"{100 * s['sparsity']:.2f}% ± {100 * s['sparsity_std']:.2f}% | {100 * s['fallback_fraction']:.2f}% | "
            f"{100 * s['dense_fraction']:.1f}% | {acc} |")
    add("")
    add("Dense paths: DGR keeps the lowest-loss iterate that still gives the full model's top-1; for these "
        "images that was an early iterate with all gates > 0 (the sparser iterates changed the prediction or "
        "cost more cross-entropy than they saved in L1). They are not fallbacks: the gates are not all ones. "
        "Kept gate sets with a loss above 1,000 (gated "
        "logits blown up by gates near the clip maximum 10): "
        + ", ".join(f"{n} {s['loss_above_1000']}" for n, s in r["routing"].items()) + ".")
    add("")
    add("| adversarial set | images | attack success | mean L-inf | mean L2 | top-1 clean -> adversarial |")
    add("|---|---:|---:|---:|---:|---:|")
    for n, a in r["attacks"].items():
        add(f"| {n} | {a['n']} | {100 * a['success_rate']:.2f}% | {a['mean_linf']:.4f} | {a['mean_l2']:.3f} | "
            f"{100 * a['clean_top1']:.2f}% -> {100 * a['adv_top1']:.2f}% |")
    add("")
    add("Target derangement (targeted sets): " + ", ".join(f"{a}->{b}" for a, b in r["target_permutation"].items())
        + ". Success of a targeted attack = the model predicts the target.")
    add("")

    # detection
    add("## Adversarial detection (Table 3, scaled to CIFAR-10)")
    add("")
    add(f"Real vs targeted-adversarial (derangement targets) images; training: {', '.join(map(str, cfg['sizes']))} "
        f"images per class drawn from the {cfg['train_per_class']}/class train pool, each with its adversarial "
        f"twin; test: the fixed {cfg['test_per_class']}/class test images and their adversarial twins; "
        f"{cfg['runs']} runs (independent training draws and classifier seeds); AUC from predicted "
        "probabilities; mean ± std (population std over runs).")
    add("")
    det = r["detection"]
    clfs = list(dict.fromkeys(x["classifier"] for x in det["cdrp"]))
    big = max(cfg["sizes"])

    def table(det):
        add("| images/class | feature | " + " | ".join(CLASSIFIER_LABELS.get(c, c) for c in clfs) + " |")
        add("|---:|---|" + "---:|" * len(clfs))
        for size in cfg["sizes"]:
            for feat in FEATURE_LABELS:
                cells = []
                for c in clfs:
                    row = next(x for x in det[feat] if x["per_class"] == size and x["classifier"] == c)
                    cells.append(f"{row['auc_mean']:.4f} ± {row['auc_std']:.4f}")
                add(f"| {size} | {FEATURE_LABELS[feat]} | " + " | ".join(cells) + " |")
        add("")

    def extra_table(det, key):
        add("| feature | " + " | ".join(CLASSIFIER_LABELS.get(c, c) for c in clfs) + " |")
        add("|---|" + "---:|" * len(clfs))
        for feat in FEATURE_LABELS:
            cells = []
            for c in clfs:
                row = next(x for x in det[feat] if x["per_class"] == big and x["classifier"] == c)
                e = row["extra"][key]
                cells.append(f"{e['auc_mean']:.4f} ± {e['auc_std']:.4f}")
            add(f"| {FEATURE_LABELS[feat]} | " + " | ".join(cells) + " |")
        add("")

    add(f"**The paper's attack** (I-FGSM, step {cfg['eps']}, {cfg['attack_steps']} steps, no projection):")
    add("")
    table(det)
    add(f"Transfer: the same detectors (trained on targeted adversarials, {big}/class) scored on the test "
        "images vs their *untargeted* I-FGSM twins:")
    add("")
    extra_table(det, "untargeted")
    if r.get("detection_bounded"):
        a = r["attacks"]["test_bounded"]
        add(f"**A bounded attack** (not in the paper; torchattacks BIM semantics): the same targets, step "
            f"{cfg['eps'] / cfg['attack_steps']:g}, {cfg['attack_steps']} steps, projected onto the L-inf ball "
            f"of radius {cfg['eps']} (= {255 * cfg['eps']:.2f}/255); targeted success {100 * a['success_rate']:.1f}% "
            f"on the test set, {100 * r['attacks']['train_bounded']['success_rate']:.1f}% on the train pool. "
            "Failed attacks stay in both sets (they are still perturbed images).")
        add("")
        table(r["detection_bounded"])
        add(f"The same detectors ({big}/class) on the test pairs whose bounded attack reached its target only:")
        add("")
        extra_table(r["detection_bounded"], "successful_only")
    if r.get("detection_official"):
        a = r["attacks"]["test_official"]
        add(f"**The official release's attack scale**: the same targets and {cfg['attack_steps']} steps, but the "
            f"step {cfg['eps']} is taken on the ImageNet-normalised input and clamped to the image's own normalised "
            f"[min, max], as the official code does: {cfg['eps']} x std = about {cfg['eps'] * 0.226:.5f} per step in "
            f"pixels, 4.4x weaker than the paper's Eq. 6 read in pixel units. Test-set L-inf mean "
            f"{a['mean_linf']:.4f}, targeted success {100 * a['success_rate']:.1f}% "
            f"({100 * r['attacks']['train_official']['success_rate']:.1f}% on the train pool). Each image is routed "
            "with a fresh optimizer (the paper's description):")
        add("")
        table(r["detection_official"])
    if r.get("detection_official_carried"):
        add("**The same official-scale adversarials routed as the official release does**: one SGD optimizer per "
            "image pair, so the adversarial image's routing starts with the momentum left by its real twin's "
            "routing (gates reset to 1, momentum not). Real images are routed as before. Any gain over the table "
            "above comes from the carried momentum, not from the image:")
        add("")
        table(r["detection_official_carried"])
    add("Training-free one-number scores on the test pairs (AUC with adversarial = positive; below 0.5: "
        "the score is lower for adversarial images), to show what makes the task easy or hard:")
    add("")
    sc = r["scalar_score_aucs"]
    keys = list(next(iter(sc.values())))
    add("| score | " + " | ".join(sc) + " |")
    add("|---|" + "---:|" * len(sc))
    for k in keys:
        add(f"| {k} | " + " | ".join(f"{sc[s][k]:.4f}" for s in sc) + " |")
    add("")
    add("![detection](detection.png)")
    add("")

    # layers
    lay = r["layers"]
    add("## Per-layer semantics (Fig. 4, Fig. 5)")
    add("")
    add(f"K-means (10 inits) and agglomerative (Ward) clustering with K=10 of each layer's gates of the "
        f"{lay['n']} real test images, scored against the true labels (H homogeneity, C completeness, "
        "V V-measure). 'vs prediction' scores the same K-means clusters against the model's predictions "
        "(DGR distils the predicted class, so misclassified images follow the predicted class's path); the "
        f"last column repeats K-means without the dense paths ({lay['n_without_dense']} images).")
    add("")
    add("| layer | channels | K-means H | C | V | agglomerative H | C | V | K-means V vs prediction | "
        "K-means V, dense paths left out |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in lay["rows"] + [lay["all_layers"]]:
        add(f"| {row['layer']} | {row['channels']} | {_f(row['kmeans_homogeneity'])} | "
            f"{_f(row['kmeans_completeness'])} | {_f(row['kmeans_v_measure'])} | "
            f"{_f(row['agglomerative_homogeneity'])} | {_f(row['agglomerative_completeness'])} | "
            f"{_f(row['agglomerative_v_measure'])} | {_f(row['kmeans_v_measure_pred'])} | "
            f"{_f(row['kmeans_v_measure_without_dense']) if 'kmeans_v_measure_without_dense' in row else '-'} |")
    add("")
    tr = lay["depth_trend"]
    parts = list(next(iter(tr.values())))
    add("Trend with depth: Spearman rank correlation of each score with the layer index, over all gate layers, "
        "over the residual blocks' outputs (and the stem), and over the gates inside the blocks (after each "
        "block's first convolution):")
    add("")
    add("| score | " + " | ".join(f"{p} (n={next(iter(tr.values()))[p]['layers']})" for p in parts) + " |")
    add("|---|" + "---:|" * len(parts))
    for k, v in tr.items():
        add(f"| {k.replace('_', ' ')} | "
            + " | ".join(f"rho {v[p]['spearman_rho']:.3f} (p {v[p]['p_value']:.2g})"
                         if v[p]["spearman_rho"] is not None else "constant" for p in parts) + " |")
    add("")
    add(f"{lay['umap']}.")
    add("")
    add("![layer scores](layer_scores.png)")
    add("")
    if "tsne_seconds" in lay:
        add("![t-SNE per layer](layers_tsne.png)")
        add("")
        nn = lay.get("tsne_dense_neighbour_fraction")
        if nn:
            last = list(nn)[-1]
            add(f"Dense paths in the t-SNE panels: of the 10 nearest t-SNE neighbours of a dense path, on average "
                f"{100 * nn[last]:.1f}% are dense paths too in {last} ({100 * min(nn.values()):.1f}-"
                f"{100 * max(nn.values()):.1f}% over the layers), against "
                f"{100 * (1 - lay['n_without_dense'] / lay['n']):.1f}% dense paths overall: they form their own group "
                "in every layer.")
            add("")

    # intra-class
    add("## Intra-class clustering (Fig. 6, Fig. 7)")
    add("")
    add(f"Per class, agglomerative (Ward) clustering of whole CDRPs into {cfg['clusters']} clusters over all its "
        f"routed real images ({cfg['test_per_class']} test + {cfg['train_per_class']} train). Clusters are "
        "numbered by size; 'acc' is the model's accuracy on the cluster's images; in the grids each row "
        "shows the images closest to the cluster's mean CDRP first, misclassified ones framed red.")
    add("")
    add("| class | images | accuracy | cluster sizes | cluster accuracies | cluster dense-path fractions | "
        "largest gate per cluster | least accurate cluster of >= 5 images: misclassified taken for |")
    add("|---|---:|---:|---|---|---|---|---|")
    for c in r["intra_class"]:
        cl = c["clusters"]
        big_cl = [x for x in cl if x["size"] >= 5] or cl
        worst = min(big_cl, key=lambda x: (x["accuracy"], x["cluster"]))
        add(f"| {c['class']} | {c['n']} | {100 * c['accuracy']:.1f}% | {', '.join(str(x['size']) for x in cl)} | "
            + ", ".join(f"{x['accuracy']:.2f}" for x in cl) + " | "
            + ", ".join(f"{x['dense_fraction']:.2f}" for x in cl) + " | "
            + ", ".join(f"{x['max_gate']:.1f}" for x in cl) + " | "
            + (f"(cluster {worst['cluster']}) " + ", ".join(f"{k} {v}" for k, v in sorted(
                worst["predicted_as"].items(), key=lambda kv: -kv[1])) if worst["predicted_as"] else "-") + " |")
    add("")
    add(" ".join(f"![{c['class']}](intra_{c['class']}.png)" for c in r["intra_class"]))
    add("")

    # divergence
    dv = r["divergence"]
    wn = r["wordnet"]
    add("## CDRP divergence under attack (Fig. 8)")
    add("")
    ci = [names.index(x) for x in wn["close_pair"]]
    di = [names.index(x) for x in wn["distant_pair"]]
    add(f"Pairs chosen by WordNet 3.0 path length between the classes' noun synsets (shortest hypernym path "
        f"through a common ancestor): close = {wn['close_pair'][0]} -> {wn['close_pair'][1]} (path "
        f"{wn['path_length'][ci[0]][ci[1]]}, via {wn['lowest_common_hypernym'][ci[0]][ci[1]]}), distant = "
        f"{wn['distant_pair'][0]} -> {wn['distant_pair'][1]} (path {wn['path_length'][di[0]][di[1]]}, via "
        f"{wn['lowest_common_hypernym'][di[0]][di[1]]}); ties are broken by the lower class index and the "
        "attack runs from the lower-index class to the other. All pair distances are in `cdrp.json`.")
    ties_c = [(names[i], names[j]) for i in range(10) for j in range(i + 1, 10)
              if wn["path_length"][i][j] == wn["path_length"][ci[0]][ci[1]]]
    ties_d = [(names[i], names[j]) for i in range(10) for j in range(i + 1, 10)
              if wn["path_length"][i][j] == wn["path_length"][di[0]][di[1]]]
    add(f"Pairs at the same distance: close {ties_c}; distant {ties_d}.")
    add("")
    add("Only adversarial images whose original the model classifies correctly and whose attack worked "
        "(targeted: prediction = target; untargeted: prediction != label) are used ('worked'), less those "
        "where DGR fell back to all-ones gates for the adversarial or the original image ('used'). A class's "
        "path is the mean CDRP of the train-pool images of that class that the model classifies correctly "
        "(fallbacks excluded). Mean Pearson r per layer (first / a middle / the last gate layer):")
    add("")
    outputs = [i for i, n in enumerate(spec.names) if not n.endswith(".conv1")]  # the stem and block outputs
    pick = [0, outputs[len(outputs) // 2], len(spec.names) - 1]
    hdr = " | ".join(f"{spec.names[i]}" for i in pick)
    add(f"| setting | used / worked / all | vs original image: {hdr} | vs original class: {hdr} | "
        f"vs reached class: {hdr} |")
    add("|---|---:|" + "---:|" * 9)
    for name, s in dv["settings"].items():
        if not s["n"]:
            add(f"| {name} | 0 / {s['n_worked']} / {s['n_total']} | " + " | ".join(["-"] * 9) + " |")
            continue
        cells = [f"{s[k]['mean'][i]:.3f}" for k in ("to_original", "to_source_class", "to_reached_class")
                 for i in pick]
        add(f"| {name} | {s['n']} / {s['n_worked']} / {s['n_total']} | " + " | ".join(cells) + " |")
    ref = dv["reference_real_to_own_class"]
    add("| reference: real test images vs own class's path | | | | | | | | "
        + " | ".join(f"{ref[i]:.3f}" for i in pick) + " |")
    add("")
    add("![divergence](divergence.png)")
    add("")
    if dv.get("class_path_notes"):
        add("Class-path notes: " + "; ".join(dv["class_path_notes"]))
        add("")
    add("## Deviations from the paper")
    add("")
    for line in DEVIATIONS:
        add("- " + line.format(**{**cfg, "sizes": " / ".join(map(str, cfg["sizes"])),
                                  "class_images": cfg["test_per_class"] + cfg["train_per_class"]}))
    add("")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    ap.add_argument("--out", default="reports/cdrp")
    ap.add_argument("--weights", default=d.weights)
    ap.add_argument("--data", default=d.data)
    ap.add_argument("--wordnet", default=d.wordnet)
    ap.add_argument("--test-per-class", type=int, default=d.test_per_class)
    ap.add_argument("--train-per-class", type=int, default=d.train_per_class)
    ap.add_argument("--sizes", default=",".join(map(str, d.sizes)))
    ap.add_argument("--runs", type=int, default=d.runs)
    ap.add_argument("--classifiers", default=",".join(d.classifiers))
    ap.add_argument("--eps", type=float, default=d.eps)
    ap.add_argument("--attack-steps", type=int, default=d.attack_steps)
    ap.add_argument("--dgr-steps", type=int, default=d.dgr_steps)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="per device")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--clusters", type=int, default=d.clusters)
    ap.add_argument("--close-pair", help="SOURCE,TARGET class names (default: WordNet-closest pair)")
    ap.add_argument("--distant-pair", help="SOURCE,TARGET class names (default: WordNet-farthest pair)")
    ap.add_argument("--no-tsne", action="store_true")
    ap.add_argument("--no-bounded", action="store_true", help="skip the eps-ball-bounded attack (not in the paper)")
    ap.add_argument("--no-official-scale", action="store_true",
                    help="skip the official release's attack scale (step eps on the normalised input)")
    ap.add_argument("--no-carried-momentum", action="store_true",
                    help="skip routing the official-scale adversarials with their real twin's SGD momentum")
    args = ap.parse_args(argv)

    import jax  # noqa: F401  (imported first: the device count must be set before JAX starts)

    from jaxroute.utils.devices import cpu_devices_per_core

    cpu_devices_per_core()
    cfg = Config(weights=str(Path(args.weights).resolve()), data=str(Path(args.data).resolve()),
                 wordnet=str(Path(args.wordnet).resolve()), test_per_class=args.test_per_class,
                 train_per_class=args.train_per_class, sizes=tuple(int(s) for s in args.sizes.split(",")),
                 runs=args.runs, classifiers=tuple(args.classifiers.split(",")), eps=args.eps,
                 attack_steps=args.attack_steps, dgr_steps=args.dgr_steps, batch_size=args.batch_size,
                 seed=args.seed, clusters=args.clusters, bounded=not args.no_bounded,
                 official_scale=not args.no_official_scale, carried_momentum=not args.no_carried_momentum,
                 close_pair=tuple(args.close_pair.split(",")) if args.close_pair else None,
                 distant_pair=tuple(args.distant_pair.split(",")) if args.distant_pair else None)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    res = run(cfg, args.out, log=log, tsne=not args.no_tsne)
    print((Path(args.out) / "cdrp.md").read_text())
    log(f"done in {res['runtime']['this_invocation_s'] / 60:.1f} min; report {Path(args.out) / 'cdrp.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
