"""Adversarial detection from routing paths (DGR paper Sec. 4.3, Eq. 4, Table 3).

A binary classifier learns to tell the CDRPs of real images (label 0) from
those of adversarial images (label 1).  The paper trains random forests,
AdaBoost and gradient boosting; we report the ROC AUC computed from the
classifiers' predicted *probabilities* (the official release scored hard
labels, which gives a single ROC point).  The same classifiers on another
feature (e.g. penultimate activations) give the baseline that measures what
the routing paths add.

Every detector follows one scikit-learn-style shape, :class:`Detector`:
``fit(x, y)`` then ``score(x)``; random ones take an explicit seed.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
from sklearn.ensemble import AdaBoostClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.metrics import roc_auc_score

CLASSIFIERS: dict[str, Callable[[int], object]] = {
    "random_forest": lambda seed: RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=seed),
    "adaboost": lambda seed: AdaBoostClassifier(n_estimators=100, random_state=seed),
    "gradient_boosting": lambda seed: GradientBoostingClassifier(n_estimators=100, random_state=seed),
}


class Detector(Protocol):
    """The shape every detector shares (scikit-learn style).

    ``fit(x, y)`` learns from (N, D) features and (N,) labels and returns the
    detector; ``score(x)`` returns (N,) scores, higher = more likely
    adversarial.  Supervised detectors take y = 0 (real) / 1 (adversarial).
    """

    def fit(self, x, y) -> "Detector": ...

    def score(self, x) -> np.ndarray: ...


def _check(x, y, what):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what}: features must be (N, D) with N labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or inf")
    if set(np.unique(y)) - {0, 1}:
        raise ValueError(f"{what}: labels must be 0 (real) / 1 (adversarial)")
    return x, y


class TreeDetector:
    """A tree-ensemble real-vs-adversarial classifier (DGR paper Eq. 4) over any feature vectors."""

    def __init__(self, classifier: str = "random_forest", seed: int = 0):
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; one of {sorted(CLASSIFIERS)}")
        self.classifier, self.seed = classifier, seed
        self.model = None

    def fit(self, x, y) -> "TreeDetector":
        x, y = _check(x, y, "training set")
        if len(np.unique(y)) < 2:
            raise ValueError("training set needs both real (0) and adversarial (1) samples")
        self.model = CLASSIFIERS[self.classifier](self.seed).fit(x, y)
        return self

    def score(self, x) -> np.ndarray:
        """Probability that each row is adversarial."""
        if self.model is None:
            raise RuntimeError("fit the detector before scoring")
        return self.model.predict_proba(np.asarray(x))[:, 1]


def detection_auc(det: Detector, x, y) -> float:
    """ROC AUC of a fitted detector's scores on real (0) / adversarial (1) rows."""
    x, y = _check(x, y, "test set")
    return float(roc_auc_score(y, det.score(x)))


def real_vs_adv(real, adv):
    """Stack real (label 0) and adversarial (label 1) feature rows."""
    real, adv = np.asarray(real), np.asarray(adv)
    return np.concatenate([real, adv]), np.concatenate([np.zeros(len(real), int), np.ones(len(adv), int)])


def _draw(train_labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` random indices per class (all of a class's samples where it has fewer)."""
    return np.concatenate([
        rng.choice(np.flatnonzero(train_labels == k), size=min(size, int(np.sum(train_labels == k))),
                   replace=False)
        for k in np.unique(train_labels)
    ])


def check_protocol(sizes, runs: int, classifiers, seed: int) -> None:
    """ValueError unless sizes and runs are integers >= 1, the classifiers known and the seed >= 0."""
    def is_int(v, lo):
        return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= lo

    if not len(sizes) or not all(is_int(s, 1) for s in sizes):
        raise ValueError(f"sizes (training images per class) must be integers >= 1, got {tuple(sizes)!r}")
    if not is_int(runs, 1):
        raise ValueError(f"runs must be an integer >= 1, got {runs!r}")
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if not len(classifiers) or unknown:
        raise ValueError(f"classifiers must be out of {sorted(CLASSIFIERS)}, got {tuple(classifiers)!r}")
    if not is_int(seed, 0):  # numpy's generators take no negative seeds
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def evaluate_protocol(train_real, train_adv, train_labels, test_real, test_adv, *, sizes=(10, 50, 100),
                      runs: int = 5, classifiers=tuple(CLASSIFIERS), seed: int = 0,
                      extra_tests: dict | None = None) -> list[dict]:
    """Table-3 protocol: for each per-class training size, ``runs`` independent draws of that
    many images per class (each with its adversarial twin) from the training pool, a fixed
    test set; AUC mean ± std (population std over the runs) per classifier.

    The draw of run ``r`` at size ``s`` comes from ``default_rng([seed, s, r])``: it does not
    depend on which other sizes are evaluated, and two feature types (CDRPs, penultimate
    activations) evaluated with the same seed and labels are trained on the same images.
    A training size above a class's pool size uses the whole pool for that class.

    ``extra_tests`` ({name: (real, adv)}) are further test sets (e.g. another attack)
    scored by the same fitted detectors; their AUCs go into each row under ``extra``.
    """
    check_protocol(sizes, runs, classifiers, seed)
    train_labels = np.asarray(train_labels)
    train_real, train_adv = np.asarray(train_real), np.asarray(train_adv)
    if not (len(train_real) == len(train_adv) == len(train_labels)):
        raise ValueError(f"training real, adversarial and label arrays differ in length: {len(train_real)}, "
                         f"{len(train_adv)}, {len(train_labels)} (each adversarial image is its real image's twin)")
    test_x, test_y = real_vs_adv(test_real, test_adv)
    extra = {k: real_vs_adv(*v) for k, v in (extra_tests or {}).items()}
    rows = []
    for size in sizes:
        aucs = {c: [] for c in classifiers}
        extra_aucs = {c: {k: [] for k in extra} for c in classifiers}
        for run in range(runs):
            idx = _draw(train_labels, int(size), np.random.default_rng([seed, int(size), run]))
            x, y = real_vs_adv(train_real[idx], train_adv[idx])
            for c in classifiers:
                det = TreeDetector(c, seed=seed * 1000 + run).fit(x, y)
                aucs[c].append(detection_auc(det, test_x, test_y))
                for k, (ex, ey) in extra.items():
                    extra_aucs[c][k].append(detection_auc(det, ex, ey))
        for c in classifiers:
            row = {"per_class": int(size), "classifier": c, "auc_mean": float(np.mean(aucs[c])),
                   "auc_std": float(np.std(aucs[c])), "runs": runs, "aucs": [float(a) for a in aucs[c]]}
            if extra:
                row["extra"] = {k: {"auc_mean": float(np.mean(v)), "auc_std": float(np.std(v))}
                                for k, v in extra_aucs[c].items()}
            rows.append(row)
    return rows


def paired_features(real: dict, adv: dict, feature: str, what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features of real images and of their adversarial twins, from two extraction outputs.

    Each adversarial image must be its real image's twin: the same sample indices in the same order.
    """
    if len(real["index"]) != len(adv["index"]) or not np.array_equal(real["index"], adv["index"]):
        raise ValueError(f"{what}real and {what}adversarial outputs must hold the same images in the same order "
                         f"(each adversarial image is its real image's twin): {len(real['index'])} vs "
                         f"{len(adv['index'])} samples")
    for d in (real, adv):
        if feature not in d:
            raise ValueError(f"feature {feature!r} is not in the outputs (they have {sorted(d)})")
    return (real[feature].reshape(len(real[feature]), -1), adv[feature].reshape(len(adv[feature]), -1))


def evaluate_outputs(train_real, train_adv, test_real, test_adv, *, feature: str = "cdrp", **protocol) -> list[dict]:
    """:func:`evaluate_protocol` over four extraction outputs (``jaxroute route`` directories)."""
    from jaxroute.extraction import load_manifest, load_shards

    dirs = {"train_real": train_real, "train_adv": train_adv, "test_real": test_real, "test_adv": test_adv}
    check_same_extraction({k: load_manifest(v) for k, v in dirs.items()})
    parts = {k: load_shards(v) for k, v in dirs.items()}
    tr, ta = paired_features(parts["train_real"], parts["train_adv"], feature, "training ")
    er, ea = paired_features(parts["test_real"], parts["test_adv"], feature, "test ")
    return evaluate_protocol(tr, ta, parts["train_real"]["label"], er, ea, **protocol)


DATA_KEYS = ("data", "split", "limit")  # what may differ between the outputs a detector compares


def check_same_extraction(manifests: dict[str, dict]) -> None:
    """Refuse outputs computed by different models, gate layouts or hyper-parameters.

    Real and adversarial paths are only comparable when everything but the
    data is the same; a detector would otherwise learn the difference of the
    settings (it scores near-perfectly on identical images routed two ways).
    """
    def setting(m):
        job = {k: v for k, v in m.get("job", {}).items() if k not in DATA_KEYS}
        return {"job": job, "extra": m.get("extra", {})}

    first, *rest = manifests.items()
    first = first[0]
    for name, m in rest:
        a, b = setting(manifests[first]), setting(m)
        if a != b:
            diff = [f"{k}: {a['job'].get(k)!r} vs {b['job'].get(k)!r}" for k in sorted(set(a["job"]) | set(b["job"]))
                    if a["job"].get(k) != b["job"].get(k)] or ["gate layout / model metadata"]
            raise ValueError(f"--{first.replace('_', '-')} and --{name.replace('_', '-')} were extracted with "
                             f"different settings ({'; '.join(diff)}); route all four with the same model and "
                             "hyper-parameters")
