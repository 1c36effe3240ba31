"""Class-specific subnetworks on CIFAR-10: §4-§5.1 of Wang, Hu, Su (arXiv:1910.02673).

    python -m experiments.subnets --out reports/subnets [--models resnet20,resnet32]
        [--train-limit N] [--test-limit N] [--seeds S] [--seed-train-limit N]
        [--n-train-canvases N] [--n-test-canvases N] [--grid-images N]

With the pretrained CIFAR-10 ResNets of ``../shared`` on the CIFAR-10 JPEG
images, one command writes into ``OUT`` for every model:

1. the ten class subnetworks (seed 0, :class:`jaxroute.routing.subnet.SubnetConfig`'s
   defaults: the paper's batch 64, γ = 0.05, τ = 0.5, 5 epochs, with Adam 0.01 on
   the batch's summed BCE, where the paper's 0.1 on the mean BCE closes every
   gate; :func:`jaxroute.routing.subnet.distill_to_dir`)
   on the first ``--train-limit`` training images, with the per-class sparsity,
   selected epoch, fallback flag and one-vs-rest AUC of logit c, full vs subnet,
   on the test images, and two acceptance checks (every subnet's AUC within 2
   points of the full network's; every sparsity <= τ or flagged);
2. a dendrogram of the ten subnetworks (average linkage on the cosine
   dissimilarity 1 - cos of the gate vectors) and the Mantel test of that
   dissimilarity against the WordNet path distance over the 45 class pairs
   (Spearman ρ, 9,999 joint relabellings, :func:`jaxroute.analysis.similarity.mantel`);
3. Fig. 3's analogue: the subnetworks of ``--seeds`` seeds per class embedded in
   2-D, coloured by class, with the mean within- and between-class cosine
   distance and a silhouette score by class.  All seeds are distilled on the
   first ``--seed-train-limit`` training images (default 10,000, 1,000 per
   class; the variation across seeds is the question, and ``S`` distillations
   on all 50,000 images are hours of CPU each); where that covers the whole
   training set, seed 0 is the subnetwork of step 1;
4. Fig. 2's analogue: the penultimate (pooled) features of the clean test images
   and their FGSM adversarials, with full weights and under each image's
   predicted-class subnetwork, embedded in 2-D; the silhouette score of clean
   vs adversarial in each feature space and the accuracy of a 5-fold logistic
   regression separating them;
5. a grid of saliency maps: ``--grid-images`` test images (one per class), one
   row per method and weights;
6. Table 1's analogue: weakly supervised localization error of six saliency
   methods on paste-set canvases, full weights vs subnetwork
   (:func:`jaxroute.explain.localize.localize`), beside the paper's numbers;
   ``--methods`` runs a subset (the grid and the table then cover those; the
   cache serves any later list, so the cheap methods' report can come first);
7. ``README.md`` (tables, figures, deviations, timings) and ``subnets.json``
   (every number).

Cache and resume: every stage's result lives under ``OUT/cache/<model>/``
(subnetwork folders resumable per epoch, localization scores per 250
canvases, JSON and NPZ files written atomically); a run started again with
the same arguments reuses them, adding a model keeps the others' cache, and
the models may run as separate processes on one ``OUT`` (``--models
resnet20`` and ``--models resnet32`` on two cores), then once more with both
for the report.  A cache written with other arguments is refused
(``OUT/cache/config.json``); it records the shared paths relative to the
repository (``../shared/...``), so ``reports/subnets/cache``, which is
kept in the repository for its hours of CPU (all but the features, minutes
to recompute), resumes in any clone with ``../shared`` beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import REPO, comma_list, configure_and_run, portable_path
from jaxroute.utils.cache import cached_json, cached_npz
from jaxroute.utils.checks import check_int

SHARED = REPO.parent / "shared"
MODELS = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th"}
METHODS = ("gradient", "deconvnet", "guided_backprop", "grad_cam", "integrated_gradients", "smoothgrad")
METHOD_LABELS = {"gradient": "Gradient", "deconvnet": "Deconvnet", "guided_backprop": "Guided BP",
                 "grad_cam": "Grad-CAM", "integrated_gradients": "Integrated gradients", "smoothgrad": "SmoothGrad"}
# Wang, Hu, Su Table 1: localization error (%), normal -> subnet, on ImageNet
PAPER_TABLE1 = {
    "VGG-16": {"gradient": (48.01, 44.21), "deconvnet": (49.87, 46.85), "guided_backprop": (41.66, 40.83),
               "grad_cam": (49.21, 46.94), "integrated_gradients": (43.05, 41.05), "smoothgrad": (53.57, 47.75)},
    "ResNet-50": {"gradient": (49.20, 41.64), "deconvnet": (47.26, 50.32), "guided_backprop": (47.52, 40.25),
                  "grad_cam": (42.63, 45.14), "integrated_gradients": (47.60, 41.85), "smoothgrad": (52.37, 51.98)},
}
AUC_GAP_POINTS = 2.0      # a subnet's AUC may fall at most this many points below the full network's
EMBEDDINGS = ("umap", "pca")
STAGES = ("subnets", "auc", "seeds", "seed_embedding", "features", "feature_embedding", "grid", "localize")


@dataclasses.dataclass(frozen=True)
class Config:
    models_dir: str = str(SHARED / "models/cifar10-resnet")
    data: str = str(SHARED / "data/cifar10-jpeg")
    wordnet: str = str(SHARED / "data/wordnet")
    models: tuple = ("resnet20", "resnet32")
    train_limit: int | None = None    # training images for the subnetworks and the α* canvases (None: all 50,000)
    test_limit: int | None = None     # test images (None: all 10,000)
    seeds: int = 5                    # subnetworks per class for Fig. 3
    seed_train_limit: int | None = 10000  # training images of Fig. 3's seeds (None: those of step 1)
    n_train_canvases: int = 1000      # paste-set canvases that tune α*
    n_test_canvases: int = 2000       # paste-set canvases that measure the error
    grid_images: int = 10             # saliency grid: the first test image of each of the first N classes
    epochs: int = 5                   # distillation epochs (the paper's T = 5)
    subnet_batch: int = 64            # images per class per distillation step (the paper's 64)
    eps: float = 8 / 255              # FGSM step for Fig. 2, pixels in [0, 1]
    methods: tuple = METHODS
    embedding: str = "umap"           # 2-D embedding of the figures: umap (the paper's) or pca
    permutations: int = 9999          # Mantel test
    batch_size: int = 100
    seed: int = 0                     # localization canvases and noise, embeddings, folds, permutations

    # what the cached results depend on (the model list is not: adding a model resumes; nor is the method
    # list: each method's table row and grid rows are files of their own)
    CACHE_FIELDS = ("models_dir", "data", "wordnet", "train_limit", "test_limit", "seeds", "seed_train_limit",
                    "n_train_canvases", "n_test_canvases", "grid_images", "epochs", "subnet_batch", "eps",
                    "embedding", "permutations", "batch_size", "seed")

    def __post_init__(self):
        models = tuple(self.models)
        if not models or any(m not in MODELS for m in models) or len(set(models)) != len(models):
            raise ValueError(f"models must be distinct names from {', '.join(MODELS)}, got {list(models)}")
        object.__setattr__(self, "models", models)
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        if not methods or any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be distinct names from {', '.join(METHODS)}, got {list(methods)}")
        object.__setattr__(self, "methods", tuple(m for m in METHODS if m in methods))  # the table's order
        lows = {"seeds": 2, "n_train_canvases": 1, "n_test_canvases": 1, "grid_images": 1, "epochs": 1, "subnet_batch": 1,
                "permutations": 1, "batch_size": 1, "seed": 0}
        for f, low in lows.items():
            check_int(getattr(self, f), f, low)
        if self.grid_images > 10:
            raise ValueError(f"grid_images must be at most 10 (one image per CIFAR-10 class), got {self.grid_images}")
        # 10 classes need images of each; the 5-fold regression of Fig. 2 needs pairs in every fold
        for f, low in (("train_limit", 20), ("test_limit", 20), ("seed_train_limit", 20)):
            check_int(getattr(self, f), f"{f} (None: all images)", low, allow_none=True)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 1 \
                or not math.isfinite(self.eps):
            raise ValueError(f"eps must be a finite FGSM step in (0, 1] (pixels in [0, 1]), got {self.eps!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")

    def check_installed(self) -> None:
        """ValueError naming the missing package when the embedding's library is not installed."""
        import importlib.util

        if self.embedding == "umap" and importlib.util.find_spec("umap") is None:
            raise ValueError("embedding umap needs umap-learn: pip install -e '.[experiments]' (or --embedding pca)")

    def cache_key(self) -> dict:
        key = {f: getattr(self, f) for f in self.CACHE_FIELDS}
        return {**key, **{f: portable_path(key[f]) for f in ("models_dir", "data", "wordnet")}}


def run_label(cfg: Config) -> str:
    """"full run" or "quick run (...)" naming every limit below the full protocol."""
    parts = []
    if cfg.train_limit is not None:
        parts.append(f"--train-limit {cfg.train_limit}")
    if cfg.test_limit is not None:
        parts.append(f"--test-limit {cfg.test_limit}")
    if cfg.epochs != 5:
        parts.append(f"--epochs {cfg.epochs}")
    if cfg.subnet_batch != 64:
        parts.append(f"--subnet-batch {cfg.subnet_batch}")
    if cfg.methods != METHODS:
        parts.append(f"--methods {','.join(cfg.methods)}")
    parts += [f"--seeds {cfg.seeds}", f"--seed-train-limit {cfg.seed_train_limit or 'all'}",
              f"--n-train-canvases {cfg.n_train_canvases}",
              f"--n-test-canvases {cfg.n_test_canvases}"]
    full = cfg.train_limit is None and cfg.test_limit is None and cfg.epochs == 5 and cfg.subnet_batch == 64
    return ("full run (" if full else "quick run (") + ", ".join(parts) + ")"


def command(cfg: Config, out: str) -> str:
    d = Config()
    parts = [f"python -m experiments.subnets --out {out}", f"--models {','.join(cfg.models)}"]
    for f in ("train_limit", "test_limit"):
        if getattr(cfg, f) is not None:
            parts.append(f"--{f.replace('_', '-')} {getattr(cfg, f)}")
    if cfg.seed_train_limit != d.seed_train_limit:
        parts.append(f"--seed-train-limit {cfg.seed_train_limit or 'all'}")
    for f in ("seeds", "n_train_canvases", "n_test_canvases", "grid_images", "epochs", "subnet_batch", "embedding",
              "permutations",
              "batch_size", "seed"):
        if getattr(cfg, f) != getattr(d, f):
            parts.append(f"--{f.replace('_', '-')} {getattr(cfg, f)}")
    if cfg.eps != d.eps:
        parts.append(f"--eps {cfg.eps!r}")
    if cfg.methods != d.methods:
        parts.append(f"--methods {','.join(cfg.methods)}")
    return " ".join(parts)


def subnet_config(cfg: Config, seed: int):
    """The distillation settings: the paper's defaults with the run's epochs, batch and ``seed``."""
    from jaxroute.routing.subnet import SubnetConfig

    return SubnetConfig(epochs=cfg.epochs, batch_size=cfg.subnet_batch, seed=seed)


# --------------------------------------------------------------------------- cached helpers
def _stage(timings, stage: str, fn):
    t = time.perf_counter()
    value = fn()
    timings.add(stage, time.perf_counter() - t)
    return value


def _float(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- pure pieces
def cosine_dissimilarity(vectors) -> np.ndarray:
    """1 - cos between the rows of ``vectors`` (n, D): a symmetric (n, n) matrix with a zero diagonal.
    An all-zero row (a subnetwork with every gate closed) has cosine 0 with every other row."""
    v = np.asarray(vectors, np.float64)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    u = v / np.where(norm > 0, norm, 1.0)
    d = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def closed_points(gates, spec) -> list[list[str]]:
    """Per gate vector (row of ``gates``), the gate points whose every gate is 0 (the channel group
    is switched off entirely; after a residual addition that cuts the path from the input)."""
    gates = np.asarray(gates)
    return [[n for n, c, o in zip(spec.names, spec.channels, spec.offsets) if not np.any(row[o:o + c] > 0)]
            for row in gates]


def within_between(d: np.ndarray, labels) -> tuple[float, float]:
    """Mean of ``d`` over the pairs (i < j) of the same label and over the pairs of different labels."""
    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), 1)
    same = labels[i] == labels[j]
    pick = lambda m: float(d[i[m], j[m]].mean()) if m.any() else float("nan")   # noqa: E731
    return pick(same), pick(~same)


def embed_2d(x, *, method: str, seed: int, metric: str = "euclidean") -> np.ndarray:
    """A 2-D embedding of the rows of ``x``: UMAP (umap-learn defaults except ``n_neighbors`` <= n - 1
    and ``random_state`` = ``seed``) or PCA; PCA ignores ``metric``."""
    x = np.asarray(x, np.float64)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)
    import warnings

    import umap

    with warnings.catch_warnings():  # "n_jobs overridden by random_state": the seeded run is single-threaded
        warnings.simplefilter("ignore", UserWarning)
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), metric=metric, random_state=seed)
        return reducer.fit_transform(x).astype(np.float32)


def separability(features, is_adv, groups, *, seed: int, folds: int = 5) -> dict:
    """How well ``features`` separate clean from adversarial rows.

    ``silhouette``: the silhouette score of the two groups (Euclidean);
    ``logreg_accuracy``: mean held-out accuracy of a logistic regression on
    standardised features over ``folds`` grouped folds (an image and its
    adversarial share ``groups`` and so a fold: no pair is split between
    fitting and testing).  None where there are fewer groups than folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, groups = np.asarray(features, np.float64), np.asarray(is_adv, int), np.asarray(groups)
    if len(np.unique(groups)) < folds or len(np.unique(y)) < 2:
        return {"silhouette": None, "logreg_accuracy": None, "logreg_std": None, "n": int(len(y))}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # the groups dealt round-robin into folds in a seeded random order (GroupKFold shuffles only from
    # scikit-learn 1.6 on)
    ids, inverse = np.unique(groups, return_inverse=True)
    fold_of = np.random.default_rng(seed).permutation(len(ids))[inverse] % folds
    cv = [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(folds)]
    acc = cross_val_score(clf, x, y, cv=cv)
    return {"silhouette": _float(silhouette_score(x, y)), "logreg_accuracy": float(acc.mean()),
            "logreg_std": float(acc.std()), "n": int(len(y))}


# --------------------------------------------------------------------------- the run
def run(cfg: Config, out: Path, log=print) -> dict:
    """Every model's stages, then ``subnets.json`` and ``README.md`` (and the figures) in ``out``."""
    from jaxroute.analysis.wordnet import wordnet_distances
    from jaxroute.data import Dataset, load_dataset
    from jaxroute.models.gated import check_dataset_fits
    from jaxroute.utils.cache import Timings, check_cache_config
    from jaxroute.utils.io import atomic_write_json, atomic_write_text
    from jaxroute.weights import load_model

    cfg.check_installed()
    out = Path(out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    check_cache_config(cache, cfg.cache_key())
    timings = Timings(cache / "timings.json", tuple(f"{s}_{m}" for m in MODELS for s in STAGES))
    t = time.perf_counter()
    train = load_dataset(cfg.data, "train", limit=cfg.train_limit)
    train = Dataset(np.asarray(train.images), np.asarray(train.labels), train.class_names, train.name)
    test = load_dataset(cfg.data, "test", limit=cfg.test_limit)
    test = Dataset(np.asarray(test.images), np.asarray(test.labels), test.class_names, test.name)
    timings.add("data", time.perf_counter() - t)
    log(f"data: {len(train.labels)} training, {len(test.labels)} test images ({timings.now['data']:.0f} s)")
    names = [str(c) for c in test.class_names]
    wordnet, _, _ = wordnet_distances(cfg.wordnet, names)
    res: dict = {"config": dataclasses.asdict(cfg), "run": run_label(cfg), "command": command(cfg, str(out)),
                 "subnet_config": dataclasses.asdict(subnet_config(cfg, 0)),
                 "n_train": int(len(train.labels)), "n_test": int(len(test.labels)), "class_names": names,
                 "wordnet_distance": wordnet.tolist(), "models": {}}
    for name in cfg.models:
        weights = Path(cfg.models_dir) / MODELS[name]
        model = load_model(name, weights)
        check_dataset_fits(model, test)
        res["models"][name] = run_model(cfg, name, model, weights, train, test, wordnet, cache / name, out,
                                        timings, log)
    res["timings"] = {"this_run": timings.now, "total": timings.total}
    atomic_write_json(out / "subnets.json", res)
    atomic_write_text(out / "README.md", report(res))
    log(f"wrote {out / 'README.md'}")
    return res


def run_model(cfg: Config, name: str, model, weights: Path, train, test, wordnet, cache: Path, out: Path,
              timings, log) -> dict:
    """The stages of one model (each cached under ``cache``) and its figures in ``out``."""
    import jax

    from jaxroute.analysis.similarity import mantel
    from jaxroute.routing.subnet import class_gates, distill_to_dir, subnet_auc

    cache.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in test.class_names]
    source = {"weights": portable_path(weights), "data": portable_path(cfg.data), "split": "train",
              "limit": cfg.train_limit}

    def distill(seed: int, data=train, folder: str = "subnets"):
        folder = cache / folder
        quiet = (folder / "subnets.npz").exists()
        return distill_to_dir(model, data, folder, config=subnet_config(cfg, seed),
                              source={**source, "limit": len(data.labels)} if data is not train else source,
                              log=None if quiet else (lambda m: log(f"{name} {folder.name}: {m}")))

    # 1. the subnetworks and their AUC
    subs = _stage(timings, f"subnets_{name}", lambda: distill(0))
    gates = class_gates(cache / "subnets", model)
    tau = subnet_config(cfg, 0).tau

    def auc():
        full, sub = subnet_auc(model, gates, test.images, test.labels, batch_size=cfg.batch_size)
        return {"full": [_float(v) for v in full], "subnet": [_float(v) for v in sub]}

    aucs = _stage(timings, f"auc_{name}", lambda: cached_json(cache / "auc.json", auc))
    closed = closed_points(gates, model.spec)
    rows = []
    for c in range(model.num_classes):
        k = int(np.flatnonzero(subs.classes == c)[0])
        f, s = aucs["full"][c], aucs["subnet"][c]
        rows.append({"class": names[c], "sparsity": float(subs.sparsity[k]),
                     "selected_epoch": int(subs.selected_epoch[k]), "fallback": bool(subs.fallback[k]),
                     "closed_points": closed[c],
                     "auc_full": f, "auc_subnet": s,
                     "auc_gap_points": None if f is None or s is None else 100 * (f - s)})
    gaps = [r["auc_gap_points"] for r in rows]
    checks = {
        "auc": {"passed": all(g is not None and g <= AUC_GAP_POINTS for g in gaps),
                "max_gap_points": max((g for g in gaps if g is not None), default=None),
                "limit_points": AUC_GAP_POINTS},
        "sparsity": {"passed": all(r["sparsity"] <= tau or r["fallback"] for r in rows), "tau": tau,
                     "fallback_classes": [r["class"] for r in rows if r["fallback"]]},
    }
    log(f"{name}: sparsity mean {np.mean(subs.sparsity):.4f}; AUC gap max {checks['auc']['max_gap_points']}")

    # 2. dendrogram and Mantel test
    d = cosine_dissimilarity(gates)
    rho, p = mantel(d, wordnet, permutations=cfg.permutations, seed=cfg.seed)
    leaves = plot_dendrogram(d, names, out / f"dendrogram_{name}.png", f"{name}: class subnetworks")
    tree = {"linkage": "average", "dissimilarity": "1 - cosine similarity of the gate vectors",
            "matrix": d.tolist(), "leaf_order": leaves, "spearman_rho": _float(rho), "mantel_p": _float(p),
            "permutations": cfg.permutations, "pairs": model.num_classes * (model.num_classes - 1) // 2}

    # 3. Fig. 3: subnetworks of several seeds
    n_seed = len(train.labels) if cfg.seed_train_limit is None else min(cfg.seed_train_limit, len(train.labels))
    if n_seed == len(train.labels):    # seed 0 is step 1's subnetwork
        stack = [gates] + [_stage(timings, f"seeds_{name}", lambda s=s: distill(s, folder=f"subnets_seed{s}")).gates
                           for s in range(1, cfg.seeds)]
    else:
        from jaxroute.data import Dataset

        part = Dataset(train.images[:n_seed], train.labels[:n_seed], train.class_names, train.name)
        stack = [_stage(timings, f"seeds_{name}", lambda s=s: distill(s, part, f"subnets_{n_seed}_seed{s}")).gates
                 for s in range(cfg.seeds)]
    # rows of distill results are class-ordered (classes = 0..K-1)
    vectors = np.concatenate(stack).astype(np.float64)
    labels = np.tile(np.arange(model.num_classes), cfg.seeds)
    dv = cosine_dissimilarity(vectors)
    within, between = within_between(dv, labels)
    from sklearn.metrics import silhouette_score

    seed_emb = _stage(timings, f"seed_embedding_{name}", lambda: cached_npz(cache / "seed_embedding.npz", lambda: {
        "xy": embed_2d(vectors, method=cfg.embedding, seed=cfg.seed, metric="cosine")}))["xy"]
    plot_embedding({"subnetworks": seed_emb}, labels, names, out / f"seeds_{name}.png",
                   f"{name}: {cfg.seeds} subnetworks per class ({cfg.embedding.upper()}, cosine)")
    seeds = {"n_seeds": cfg.seeds, "n_train": int(n_seed), "within_class_cosine_distance": _float(within),
             "between_class_cosine_distance": _float(between),
             "silhouette_by_class": _float(silhouette_score(dv, labels, metric="precomputed")),
             "sparsity_mean_per_seed": [float(np.mean(s > 0)) for s in stack]}

    # 4. Fig. 2: penultimate features of clean and FGSM images, full vs subnet
    feats = _stage(timings, f"features_{name}", lambda: cached_npz(cache / "features.npz",
                                                                    lambda: fig2_features(model, gates, test, cfg)))
    sel = feats["selected"]
    groups = np.concatenate([np.flatnonzero(sel), np.flatnonzero(sel)])
    is_adv = np.repeat([0, 1], int(sel.sum()))
    spaces = {}
    for space in ("full", "subnet"):
        x = np.concatenate([feats[f"clean_{space}"][sel], feats[f"adv_{space}"][sel]])
        spaces[space] = {"x": x, **separability(x, is_adv, groups, seed=cfg.seed)}

    def embed_features():
        if len(is_adv) < 4:
            return {s: np.zeros((len(is_adv), 2), np.float32) for s in spaces}
        return {s: embed_2d(v["x"], method=cfg.embedding, seed=cfg.seed) for s, v in spaces.items()}

    emb = _stage(timings, f"feature_embedding_{name}",
                 lambda: cached_npz(cache / "feature_embedding.npz", embed_features))
    plot_embedding({f"{s} weights" if s == "full" else "predicted-class subnetwork": emb[s] for s in spaces}, is_adv,
                   ["clean", f"FGSM ε={cfg.eps * 255:.3g}/255"], out / f"features_{name}.png",
                   f"{name}: penultimate features ({cfg.embedding.upper()})")
    labels_test = np.asarray(test.labels)
    fig2 = {"eps": cfg.eps, "n_images": int(len(sel)), "n_selected": int(sel.sum()),
            "clean_accuracy": float(np.mean(feats["clean_pred"] == labels_test)),
            "attack_success": float(np.mean(feats["adv_pred"][feats["clean_pred"] == labels_test]
                                            != labels_test[feats["clean_pred"] == labels_test]))
            if np.any(feats["clean_pred"] == labels_test) else None,
            "feature_dim": int(feats["clean_full"].shape[1]),
            **{s: {k: v for k, v in spaces[s].items() if k != "x"} for s in spaces}}

    # 5. saliency grid (before Table 1: minutes, where IG and SmoothGrad's localization takes hours)
    grid = {}
    for m in cfg.methods:
        grid.update(_stage(timings, f"grid_{name}", lambda m=m: cached_npz(
            cache / f"grid_{m}.npz", lambda: grid_maps(model, gates, test, cfg, m))))
    plot_grid(grid, names, cfg.methods, out / f"saliency_{name}.png", name)

    # 6. Table 1: localization
    def table1(method: str):
        from jaxroute.explain.localize import localize

        return localize(model, train.images, train.labels, test.images, test.labels, methods=[method],
                        subnets=gates, n_train=cfg.n_train_canvases, n_test=cfg.n_test_canvases,
                        key=jax.random.key(cfg.seed), batch_size=min(cfg.batch_size, 64),
                        cache_dir=cache / "localize", log=lambda m: log(f"{name} {m}"))[method]

    # one cached file per method, and the scores of every 250 canvases under localize/: on a CPU,
    # IG and SmoothGrad on 2 x 3,000 canvases take hours
    loc = {m: _stage(timings, f"localize_{name}", lambda m=m: cached_json(cache / f"table1_{m}.json",
                                                                         lambda: table1(m)))
           for m in cfg.methods}


    return {"classes": rows, "checks": checks, "sparsity_mean": float(np.mean(subs.sparsity)),
            "dendrogram": tree, "seeds": seeds, "fig2": fig2, "table1": loc,
            "figures": {"dendrogram": f"dendrogram_{name}.png", "seeds": f"seeds_{name}.png",
                        "features": f"features_{name}.png", "saliency": f"saliency_{name}.png"},
            "grid_images": [int(i) for i in grid["index"]]}


def fig2_features(model, gates, test, cfg: Config) -> dict:
    """FGSM adversarials of the test images and the penultimate features of clean and adversarial images
    with full weights and under each image's predicted-class subnetwork.

    Full weights are the all-ones gates (a gate multiplies its channel, so 1 changes nothing), which puts
    both weights in one batch of per-sample gates and one compiled program."""
    import jax
    import jax.numpy as jnp

    from jaxroute.attacks import FGSMConfig, attack_dataset
    from jaxroute.utils.devices import map_batches

    adv = attack_dataset(model.logits, test.images, test.labels, attack="fgsm", config=FGSMConfig(eps=cfg.eps),
                         batch_size=cfg.batch_size)
    clean_pred = adv["clean_pred"].astype(np.int32)
    adv_pred = adv["adv_pred"].astype(np.int32)
    g = jnp.asarray(gates, jnp.float32)
    features = jax.jit(lambda x, gv: model.capture(x, gv).features)

    def both(_, x, pred):
        gv = jnp.concatenate([jnp.ones_like(g[pred]), g[pred]])
        f = features(jnp.concatenate([x, x]), gv)
        n = x.shape[0]
        return {"full": f[:n], "subnet": f[n:]}

    batch = min(cfg.batch_size, len(clean_pred))
    clean = map_batches(both, [test.images, clean_pred], batch)
    advf = map_batches(both, [adv["images"], adv_pred], batch)
    labels = np.asarray(test.labels)
    selected = (clean_pred == labels) & (adv_pred != labels)   # clean-correct images whose adversarial fools
    return {"clean_full": clean["full"], "clean_subnet": clean["subnet"], "adv_full": advf["full"],
            "adv_subnet": advf["subnet"], "clean_pred": clean_pred, "adv_pred": adv_pred, "selected": selected,
            "adv_l2": adv["l2"]}


def grid_maps(model, gates, test, cfg: Config, method: str) -> dict:
    """Saliency maps of ``method`` for the first test image of each of the first ``grid_images`` classes,
    full weights and the image's class subnetwork (the label explained, as in Table 1; SmoothGrad's noise
    per image from ``fold_in(key, i)``, the same for both weights)."""
    import jax
    import jax.numpy as jnp

    from jaxroute.explain.methods import NEEDS_KEY, explain

    labels = np.asarray(test.labels)
    index = np.array([int(np.flatnonzero(labels == c)[0]) for c in range(cfg.grid_images) if np.any(labels == c)])
    x = jnp.asarray(test.images[index])
    y = jnp.asarray(labels[index], jnp.int32)
    g = jnp.asarray(gates, jnp.float32)[y]
    xx, yy, gg = jnp.concatenate([x, x]), jnp.concatenate([y, y]), jnp.concatenate([jnp.ones_like(g), g])
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.concatenate([jnp.arange(len(index))] * 2))
    out = {"index": index, "labels": np.asarray(y), "images": np.asarray(x)}
    n = len(index)
    maps = np.asarray(jax.jit(lambda a, t, gv, k: explain(model, gv, a, t, method=method,
                                                          key=k if method in NEEDS_KEY else None).maps)(
        xx, yy, gg, keys))
    out[f"{method}_full"], out[f"{method}_subnet"] = maps[:n], maps[n:]
    return out


# --------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> None:
    from jaxroute.utils.io import compact_png

    fig.savefig(path, dpi=100)
    compact_png(path)


def plot_dendrogram(d: np.ndarray, names, path: Path, title: str) -> list[str]:
    """Average-linkage dendrogram of the dissimilarity ``d``; returns the leaf order (class names)."""
    from matplotlib.figure import Figure
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    z = linkage(squareform(d, checks=False), method="average")
    fig = Figure(figsize=(6, 3.2))
    ax = fig.add_subplot()
    r = dendrogram(z, labels=list(names), ax=ax, leaf_rotation=45, color_threshold=0)
    ax.set_ylabel("1 - cosine similarity")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return [str(n) for n in r["ivl"]]


def plot_embedding(panels: dict, labels, names, path: Path, title: str) -> None:
    """One scatter panel per 2-D embedding, coloured by ``labels`` (indices into ``names``)."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(panels), 3.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = matplotlib.colormaps["tab10"]
    labels = np.asarray(labels)
    for ax, (panel, xy) in zip(axes, panels.items()):
        for c in np.unique(labels):
            s = labels == c
            ax.scatter(xy[s, 0], xy[s, 1], s=8 if len(labels) < 200 else 3, color=cmap(int(c) % 10),
                       label=names[int(c)], linewidths=0)
        ax.set_title(panel, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, lab = axes[0].get_legend_handles_labels()
    fig.legend(handles, lab, loc="lower center", ncol=min(5, len(lab)), fontsize=7, markerscale=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    _save(fig, path)


def plot_grid(grid: dict, names, methods, path: Path, title: str) -> None:
    """The images (top row) and one row per method and weights (full, subnet) of saliency maps."""
    from matplotlib.figure import Figure

    images, labels = grid["images"], grid["labels"]
    n = len(images)
    rows = 1 + 2 * len(methods)
    fig = Figure(figsize=(1.1 * n + 1.4, 1.1 * rows))
    axes = fig.subplots(rows, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(np.clip(images[j], 0, 1))
        axes[0, j].set_title(names[int(labels[j])], fontsize=7)
    for i, m in enumerate(methods):
        for v, variant in enumerate(("full", "subnet")):
            r = 1 + 2 * i + v
            maps = grid[f"{m}_{variant}"]
            for j in range(n):
                mx = float(maps[j].max())
                axes[r, j].imshow(maps[j] / mx if mx > 0 else maps[j], cmap="inferno", vmin=0, vmax=1)
            axes[r, 0].set_ylabel(f"{METHOD_LABELS[m]}\n{variant}", fontsize=6, rotation=0, ha="right",
                                  va="center")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}: saliency with full weights and under the class subnetwork", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- the report
DEVIATIONS = (
    "Network and data: the shared pretrained CIFAR-10 ResNet-20 and ResNet-32 on CIFAR-10 decoded from the shared "
    "JPEG files, not the paper's ImageNet VGG-16 / ResNet-50; gates after every BN+ReLU and residual ReLU "
    "(`post_act`), where the paper gates every layer's output channels.",
    "Subnetworks: distilled on the first `--train-limit` training images (class-interleaved) when limited, the "
    "paper on the whole training set; the choices where the paper is silent (initialisation 1, clipping to "
    "[0, 10], sparsity = fraction of gates > 0, one snapshot per epoch, fallback to the sparsest snapshot) are "
    "those of `jaxroute.routing.subnet`.",
    "Fig. 3 analogue: the paper embeds the subnetworks of its 1,000 ImageNet classes; with ten classes this "
    "embeds several seeds per class instead, distilled on the first `--seed-train-limit` training images "
    "(default 10,000) to keep the seeds affordable on a CPU.",
    "Dendrogram: average linkage on 1 - cosine similarity of the gate vectors (the paper does not name its "
    "linkage or distance); the Mantel test compares that dissimilarity with the WordNet path length "
    "(Spearman ρ, two-sided, joint relabelling of the classes of the WordNet matrix).",
    "Fig. 3 and Fig. 2 analogues embed with UMAP (umap-learn defaults, `n_neighbors` capped at n - 1, seeded, "
    "cosine metric for the gate vectors) unless `--embedding pca`; the numbers (distances, silhouettes, "
    "regression accuracy) are computed in the original spaces, not in the embedding.",
    "Fig. 2 analogue: FGSM with ε = 8/255 on pixels in [0, 1] (a common CIFAR-10 budget, not taken from the paper), "
    "on the clean-correct test images whose adversarial is misclassified; features = the pooled penultimate "
    "features (the input of the last linear layer); each image (clean or adversarial) runs under the subnetwork "
    "of the class the full network predicts for it; the logistic regression keeps an image and its adversarial "
    "in the same fold.",
    "Table 1 analogue: CIFAR-10 has no boxes, so the canvases are the paste set (a 64×64 mosaic of other classes "
    "with the class image pasted at a random offset, the box its square); α* tuned on `--n-train-canvases` "
    "canvases of training images (the paper: 5,000 ImageNet images), the error on `--n-test-canvases` canvases of "
    "test images; the explained class is the pasted image's label; maps as in `jaxroute.explain` "
    "(max |attribution| over colour channels; IG with 50 Gauss-Legendre points; SmoothGrad 50 samples, σ = 0.15).",
    "Saliency grid: the first test image of each class, the label explained, each map scaled to its own maximum.",
)


def _f(v, fmt="{:.4f}") -> str:
    return "–" if v is None else fmt.format(v)


def report(res: dict) -> str:
    """The Markdown report of a :func:`run` result."""
    cfg, sc = res["config"], res["subnet_config"]
    lines = [
        "# Class-specific subnetworks on CIFAR-10 (Wang, Hu, Su, arXiv:1910.02673, §4-§5.1)", "",
        f"Run: **{res['run']}**; {res['n_train']} training and {res['n_test']} test images; models "
        f"{', '.join(res['models'])}. Regenerate with `{res['command']}`.", "",
        f"Subnetworks: Adam {sc['lr']:g} on the batch's {'summed' if sc['bce_reduction'] == 'sum' else 'mean'} "
        f"BCE, γ = {sc['gamma']:g}, τ = {sc['tau']:g}, batch {sc['batch_size']} per class, {sc['epochs']} epochs, "
        "seed 0 (the paper: Adam 0.1 on the mean BCE, γ = 0.05, τ = 0.5, 64, 5; its learning rate and mean "
        "close every gate, see `jaxroute.routing.subnet`); sparsity = fraction of gates > 0 (lower is sparser).",
        "",
    ]
    for name, m in res["models"].items():
        c = m["checks"]
        lines += [f"## {name}", "", "### Subnetworks: sparsity and one-vs-rest AUC of logit c (test images)", "",
                  "| class | sparsity | selected epoch | fallback | AUC full | AUC subnet | gap (points) | "
                  "closed gate points |",
                  "|---|---:|---:|---|---:|---:|---:|---|"]
        for r in m["classes"]:
            lines.append(f"| {r['class']} | {r['sparsity']:.4f} | {r['selected_epoch']} | "
                         f"{'yes' if r['fallback'] else 'no'} | {_f(r['auc_full'])} | {_f(r['auc_subnet'])} | "
                         f"{_f(r['auc_gap_points'], '{:+.2f}')} | {len(r['closed_points'])}"
                         + (f" ({', '.join(r['closed_points'][:3])}{', ...' if len(r['closed_points']) > 3 else ''})"
                            if r["closed_points"] else "") + " |")
        lines += ["", "Closed gate points: gate points whose every gate is 0 in the subnetwork (up to three named); "
                  "a closed point after a residual addition cuts every path from the input, which leaves logit c "
                  "constant and every saliency map zero.", "", f"- AUC check (every subnet within {c['auc']['limit_points']:g} points of the full network, "
                  f"gap = full - subnet): **{'PASS' if c['auc']['passed'] else 'FAIL'}** (largest gap "
                  f"{_f(c['auc']['max_gap_points'], '{:+.2f}')} points)",
                  f"- Sparsity check (every sparsity <= τ = {c['sparsity']['tau']:g} or flagged as fallback): "
                  f"**{'PASS' if c['sparsity']['passed'] else 'FAIL'}** (mean sparsity {m['sparsity_mean']:.4f}; "
                  f"fallback classes: {', '.join(c['sparsity']['fallback_classes']) or 'none'})", ""]
        t = m["dendrogram"]
        lines += ["### Subnetwork similarity and WordNet (dendrogram)", "",
                  f"![dendrogram]({m['figures']['dendrogram']})", "",
                  f"Average linkage on {t['dissimilarity']}; leaf order: {', '.join(t['leaf_order'])}. "
                  f"Spearman ρ between subnet dissimilarity and WordNet path distance over the {t['pairs']} class "
                  f"pairs: **{_f(t['spearman_rho'], '{:+.3f}')}**, Mantel p = {_f(t['mantel_p'], '{:.4f}')} "
                  f"({t['permutations']} permutations, two-sided). The paper shows the dendrogram only "
                  "(semantically close classes merge early); it gives no correlation.", ""]
        s = m["seeds"]
        lines += [f"### Fig. 3 analogue: {s['n_seeds']} subnetworks per class", "",
                  f"![subnetworks of several seeds]({m['figures']['seeds']})", "",
                  f"Seeds 0-{s['n_seeds'] - 1} of every class, distilled on the first {s['n_train']} training "
                  f"images; {cfg['embedding'].upper()} of the gate vectors (cosine metric). "
                  f"Mean cosine distance within a class (across seeds) {_f(s['within_class_cosine_distance'])}, "
                  f"between classes {_f(s['between_class_cosine_distance'])}; silhouette by class (cosine) "
                  f"{_f(s['silhouette_by_class'], '{:+.3f}')}. The paper: subnetworks of one class from different "
                  "runs cluster together.", ""]
        f = m["fig2"]
        lines += ["### Fig. 2 analogue: clean vs FGSM features, full weights vs predicted-class subnetwork", "",
                  f"![features]({m['figures']['features']})", "",
                  f"{cfg['embedding'].upper()} of each feature space; the numbers below are computed on the "
                  "features themselves. "
                  f"FGSM ε = {f['eps'] * 255:.3g}/255: clean accuracy {f['clean_accuracy']:.4f}, attack success "
                  f"on the clean-correct images {_f(f['attack_success'])}; {f['n_selected']} of {f['n_images']} "
                  f"images selected (clean-correct, adversarial wrong), {f['feature_dim']}-d features.", "",
                  "| features | silhouette clean vs adversarial | 5-fold logistic regression accuracy |",
                  "|---|---:|---:|"]
        for space, label in (("full", "full weights"), ("subnet", "predicted-class subnetwork")):
            v = f[space]
            acc = "–" if v["logreg_accuracy"] is None else f"{v['logreg_accuracy']:.4f} ± {v['logreg_std']:.4f}"
            lines.append(f"| {label} | {_f(v['silhouette'], '{:+.4f}')} | {acc} |")
        a, b = f["full"]["logreg_accuracy"], f["subnet"]["logreg_accuracy"]
        verdict = ("not measured (too few selected images)" if a is None or b is None else
                   ("yes" if b > a else "**no**") + f" (subnet {b:.4f} vs full {a:.4f})")
        lines += ["", f"The paper's claim (adversarial features separate better under the subnetwork): {verdict}.",
                  ""]
        lines += ["### Table 1 analogue: localization error (%) on paste-set canvases", "",
                  f"α* tuned on {cfg['n_train_canvases']} training canvases, error on {cfg['n_test_canvases']} test "
                  "canvases; paper columns: ImageNet, normal → subnet.", "",
                  "| method | error full | error subnet | α* full / subnet | energy in box full / subnet | "
                  "paper VGG-16 | paper ResNet-50 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for meth, v in m["table1"].items():
            fu, su = v["full"], v["subnet"]
            pv, pr = PAPER_TABLE1["VGG-16"][meth], PAPER_TABLE1["ResNet-50"][meth]
            lines.append(f"| {METHOD_LABELS[meth]} | {fu['err']:.2f} | {su['err']:.2f} | {fu['alpha_star']:g} / "
                         f"{su['alpha_star']:g} | {fu['energy_in_box']:.4f} / {su['energy_in_box']:.4f} | "
                         f"{pv[0]:.2f} → {pv[1]:.2f} | {pr[0]:.2f} → {pr[1]:.2f} |")
        missing = [METHOD_LABELS[x] for x in METHODS if x not in m["table1"]]
        if missing:
            lines += ["", f"Not in this run (`--methods`): {', '.join(missing)}."]
        better = [meth for meth, v in m["table1"].items() if v["subnet"]["err"] < v["full"]["err"]]
        lines += ["", f"Subnet error lower than full for {len(better)} of {len(m['table1'])} methods "
                  f"({', '.join(METHOD_LABELS[x] for x in better) or 'none'}); the paper: 6 of 6 (VGG-16), "
                  "4 of 6 (ResNet-50).", "",
                  f"![saliency maps]({m['figures']['saliency']})", "",
                  f"Saliency grid: test images {m['grid_images']}; rows: each method with full weights, then under "
                  "the image's class subnetwork.", ""]
    tm = res["timings"]
    stages = sorted(set(tm["this_run"]) | set(tm["total"]))
    lines += ["## Timings (seconds)", "",
              "| stage | this invocation | all invocations (cached stages) |", "|---|---:|---:|"]
    for s in stages:
        lines.append(f"| {s} | {_f(tm['this_run'].get(s), '{:.1f}')} | {_f(tm['total'].get(s), '{:.1f}')} |")
    lines += ["", "## Figures", ""]
    for name, m in res["models"].items():
        lines += [f"- {name}: " + ", ".join(f"[{v}]({v})" for v in m["figures"].values())]
    lines += ["", "## Deviations from the paper", ""] + [f"- {d}" for d in DEVIATIONS] + [""]
    return "\n".join(lines)


def count_or_all(text: str) -> int | None:
    """``--seed-train-limit``'s value: a count, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Config()
    p.add_argument("--out", default="reports/subnets")
    p.add_argument("--models", default=",".join(d.models), help="comma-separated: resnet20, resnet32")
    p.add_argument("--train-limit", type=int, default=None, help="first N training images (default: all 50,000)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="subnetworks per class for the Fig. 3 analogue")
    p.add_argument("--seed-train-limit", type=count_or_all, default=d.seed_train_limit,
                   help="first N training images for the Fig. 3 seeds, or 'all' (those of the subnetworks; "
                        f"default {d.seed_train_limit})")
    p.add_argument("--n-train-canvases", type=int, default=d.n_train_canvases)
    p.add_argument("--n-test-canvases", type=int, default=d.n_test_canvases)
    p.add_argument("--grid-images", type=int, default=d.grid_images)
    p.add_argument("--epochs", type=int, default=d.epochs, help="distillation epochs (the paper's 5)")
    p.add_argument("--subnet-batch", type=int, default=d.subnet_batch,
                   help="images per class per distillation step (the paper's 64)")
    p.add_argument("--eps", type=float, default=d.eps, help="FGSM step, pixels in [0, 1] (default 8/255)")
    p.add_argument("--methods", default=",".join(d.methods), help="saliency methods, comma-separated")
    p.add_argument("--embedding", choices=EMBEDDINGS, default=d.embedding)
    p.add_argument("--permutations", type=int, default=d.permutations)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--models-dir", default=d.models_dir)
    p.add_argument("--data", default=d.data)
    p.add_argument("--wordnet", default=d.wordnet)
    args = p.parse_args(argv)

    def make_config() -> Config:
        cfg = Config(models_dir=os.path.abspath(args.models_dir), data=os.path.abspath(args.data),
                     wordnet=os.path.abspath(args.wordnet), models=comma_list(args.models),
                     train_limit=args.train_limit, test_limit=args.test_limit, seeds=args.seeds,
                     seed_train_limit=args.seed_train_limit,
                     n_train_canvases=args.n_train_canvases, n_test_canvases=args.n_test_canvases,
                     grid_images=args.grid_images, epochs=args.epochs, subnet_batch=args.subnet_batch, eps=args.eps,
                     methods=comma_list(args.methods), embedding=args.embedding, permutations=args.permutations,
                     batch_size=args.batch_size, seed=args.seed)
        cfg.check_installed()
        return cfg

    return configure_and_run(p, make_config, run, args.out)


if __name__ == "__main__":
    sys.exit(main())
