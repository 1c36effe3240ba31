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


def evaluate_protocol(train_real, train_adv, train_labels, test_real, test_adv, *, sizes=(10, 50, 100),
                      runs: int = 5, classifiers=tuple(CLASSIFIERS), seed: int = 0) -> list[dict]:
    """Table-3 protocol: for each per-class training size, ``runs`` independent draws of that
    many images per class (each with its adversarial twin) from the training pool, a fixed
    test set; AUC mean ± std per classifier."""
    train_labels = np.asarray(train_labels)
    test_x, test_y = real_vs_adv(test_real, test_adv)
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        aucs = {c: [] for c in classifiers}
        for run in range(runs):
            idx = np.concatenate([
                rng.choice(np.flatnonzero(train_labels == k), size=min(size, int(np.sum(train_labels == k))),
                           replace=False)
                for k in np.unique(train_labels)
            ])
            x, y = real_vs_adv(np.asarray(train_real)[idx], np.asarray(train_adv)[idx])
            for c in classifiers:
                det = fit_detector(c, x, y, seed=seed * 1000 + run)
                aucs[c].append(detection_auc(det, test_x, test_y))
        for c in classifiers:
            rows.append({"per_class": size, "classifier": c, "auc_mean": float(np.mean(aucs[c])),
                         "auc_std": float(np.std(aucs[c])), "runs": runs})
    return rows
