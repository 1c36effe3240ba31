"""Adversarial detection from routing paths (DGR paper Sec. 4.3, Eq. 4, Table 3).

A binary classifier learns to tell the CDRPs of real images (label 0) from
those of adversarial images (label 1).  The paper trains random forests,
AdaBoost and gradient boosting; we report the ROC AUC computed from the
classifiers' predicted *probabilities* (the official release scored hard
labels, which gives a single ROC point).  The same classifiers on another
feature (e.g. penultimate activations) give the baseline that measures what
the routing paths add.

Detectors follow an init/fit/score shape over numpy arrays; each fit takes
an explicit seed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from sklearn.ensemble import AdaBoostClassifier, GradientBoostingClassifier, RandomForestClassifier
from sklearn.metrics import roc_auc_score

CLASSIFIERS: dict[str, Callable[[int], object]] = {
    "random_forest": lambda seed: RandomForestClassifier(n_estimators=200, n_jobs=-1, random_state=seed),
    "adaboost": lambda seed: AdaBoostClassifier(n_estimators=100, random_state=seed),
    "gradient_boosting": lambda seed: GradientBoostingClassifier(n_estimators=100, random_state=seed),
}


def _check(x, y, what):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what}: features must be (N, D) with N labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: features contain NaN or inf")
    if set(np.unique(y)) - {0, 1}:
        raise ValueError(f"{what}: labels must be 0 (real) / 1 (adversarial)")
    return x, y


@dataclasses.dataclass
class Detector:
    """A fitted real-vs-adversarial classifier."""

    name: str
    model: object

    def score(self, x) -> np.ndarray:
        """Probability that each row is adversarial."""
        return self.model.predict_proba(np.asarray(x))[:, 1]


def fit_detector(name: str, x, y, seed: int) -> Detector:
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; one of {sorted(CLASSIFIERS)}")
    x, y = _check(x, y, "training set")
    if len(np.unique(y)) < 2:
        raise ValueError("training set needs both real (0) and adversarial (1) samples")
    return Detector(name, CLASSIFIERS[name](seed).fit(x, y))


def detection_auc(det: Detector, x, y) -> float:
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
                det = fit_detector(c, x, y, seed=seed * 1000 + run)
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
