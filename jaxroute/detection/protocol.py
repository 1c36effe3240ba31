"""The evaluation protocol of the feature-space detectors (Lee et al. 2018's reference code).

1. Selection: keep the images that are classified correctly clean and with
   Gaussian noise, and misclassified after the attack (:func:`select`).  The
   noisy twin adds Gaussian noise whose expected L2 norm equals the attack's
   mean L2 perturbation (:func:`noise_sigma`, :func:`noisy_twins`).
2. Characteristics: per image, the detector's features at every candidate
   hyper-parameter (Mahalanobis: ε; LID: k; KD+PU: one candidate), one
   (n, F) block each for the adversarial (label 1), clean and noisy (label 0)
   images.
3. Split (:func:`block_split`, ``block_split_adv`` plus the ``pivot`` step of
   ``ADV_Regression.py`` in ``pokaxpoka/deep_Mahalanobis_detector``): rows
   are stacked adversarial, clean, noisy; the first 10% of each block is
   the validation part, the other 90% the test part; within the validation
   part (clean, noisy, adversarial thirds) the first half of each sixth
   trains a ``LogisticRegressionCV`` and the second half scores it.  Before
   the split, all three blocks are reordered by one fixed permutation of the
   images (so twins stay in the same part; run r of ``runs`` uses
   permutation r).
4. Choice: the candidate whose logistic regression has the highest TNR at
   95% TPR on the second half (the reference's criterion; the first one on
   ties) is scored on the test part: AUROC.
5. Unknown attack: the candidate and the regression chosen and fitted on
   FGSM score the test part of another attack's characteristics.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score, roc_curve

from jaxroute.utils.checks import check_int


def select(labels, clean_pred, noisy_pred, adv_pred) -> np.ndarray:
    """Boolean mask: clean-correct, noisy-correct and adversarial-wrong."""
    y = np.asarray(labels)
    return (np.asarray(clean_pred) == y) & (np.asarray(noisy_pred) == y) & (np.asarray(adv_pred) != y)


def noise_sigma(l2, image_shape: Sequence[int]) -> float:
    """Per-pixel std whose noise has (approximately) the attack's mean L2 norm: mean(l2) / √(H·W·C)."""
    l2 = np.asarray(l2, np.float64)
    if l2.size == 0 or not np.isfinite(l2).all():
        raise ValueError("need the finite L2 norms of at least one adversarial perturbation")
    return float(l2.mean() / np.sqrt(np.prod(image_shape)))


def noisy_twins(x: jax.Array, sigma: float, key: jax.Array) -> jax.Array:
    """x + N(0, σ²) per pixel, clipped to [0, 1] (the images' range)."""
    return jnp.clip(x + sigma * jax.random.normal(key, x.shape, x.dtype), 0.0, 1.0)


def block_split(n: int, train_frac: float = 0.1):
    """Row indices into the stacked (adversarial, clean, noisy) array of 3n rows (each block n rows).

    Returns ``(fit, val, test)``: the regression's training rows, its
    validation rows and the test rows, exactly as the reference's
    ``block_split_adv`` followed by its ``pivot`` slicing (which, when the
    validation part is not divisible by 6, lets a slice cross a block
    boundary; kept as is).
    """
    part = n                                   # int(3n / 3)
    adv, clean, noisy = np.arange(0, part), np.arange(part, 2 * part), np.arange(2 * part, 3 * n)
    nt = int(part * train_frac)
    val = np.concatenate([clean[:nt], noisy[:nt], adv[:nt]])
    test = np.concatenate([clean[nt:], noisy[nt:], adv[nt:]])
    p = len(val) // 6
    fit = np.concatenate([val[:p], val[2 * p:3 * p], val[4 * p:5 * p]])
    check = np.concatenate([val[p:2 * p], val[3 * p:4 * p], val[5 * p:]])
    return fit, check, test


def tnr_at_tpr95(y, s) -> float:
    """True-negative rate at the first threshold whose true-positive rate reaches 95%."""
    fpr, tpr, _ = roc_curve(y, s)
    return float(1.0 - fpr[np.searchsorted(tpr, 0.95, side="left")])


CV_FOLDS = 5   # LogisticRegressionCV's default folds, as the reference code


def _reference_defaults() -> dict:
    """The reference's ``LogisticRegressionCV`` defaults spelled out: an L2 penalty picked by accuracy.
    scikit-learn 1.9 warns on every fit that these defaults will change (its ``"warn"`` sentinels); naming
    them keeps today's fit and the job's output free of thousands of FutureWarnings."""
    params = inspect.signature(LogisticRegressionCV).parameters
    spelled = {"l1_ratios": (0.0,), "use_legacy_attributes": False}   # only where the sentinel exists
    return {"scoring": "accuracy",
            **{k: v for k, v in spelled.items() if k in params and params[k].default == "warn"}}


_REFERENCE_DEFAULTS = _reference_defaults()


class LogisticDetector:
    """``LogisticRegressionCV`` on characteristics (fit / score shape of :class:`~jaxroute.detection.Detector`).

    scikit-learn's defaults as the reference code (10 Cs, 5 folds, ``lbfgs``);
    ``solver="liblinear"`` is about 10x faster on small sets (it also
    penalises the intercept).
    """

    def __init__(self, seed: int = 0, solver: str = "lbfgs"):
        self.seed, self.solver = seed, solver
        self.model = None

    def fit(self, x, y) -> "LogisticDetector":
        x, y = np.asarray(x, np.float64), np.asarray(y)
        labels, counts = np.unique(y, return_counts=True)
        if len(labels) < 2:
            raise ValueError("the regression's training rows need both real (0) and adversarial (1) images")
        if counts.max() < CV_FOLDS:   # scikit-learn's stratified folds would fail with a less clear message
            raise ValueError(f"the regression's training rows hold {dict(zip(labels.tolist(), counts.tolist()))} "
                             f"images per label; its {CV_FOLDS}-fold validation needs at least {CV_FOLDS} of one "
                             "label (select more images)")
        self.model = LogisticRegressionCV(random_state=self.seed, max_iter=1000, solver=self.solver,
                                          **_REFERENCE_DEFAULTS).fit(x, y)
        return self

    def score(self, x) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit the detector before scoring")
        return self.model.predict_proba(np.asarray(x, np.float64))[:, 1]


def _stack(blocks) -> tuple[np.ndarray, np.ndarray]:
    adv, clean, noisy = (np.asarray(b, np.float64).reshape(len(b), -1) for b in blocks)
    if not len(adv) == len(clean) == len(noisy):
        raise ValueError(f"adversarial, clean and noisy blocks differ in length: {len(adv)}, {len(clean)}, {len(noisy)}")
    x = np.concatenate([adv, clean, noisy])
    y = np.r_[np.ones(len(adv), int), np.zeros(2 * len(adv), int)]
    return x, y


def _permuted(blocks, perm):
    return [np.asarray(b)[perm] for b in blocks]


MIN_SELECTED = 40


def fit_choose(candidates: Mapping[str, Sequence], perm, seed: int = 0,
               detector: Callable[[int], object] = LogisticDetector) -> dict:
    """Fit a regression per candidate on the split's fitting rows, choose by validation TNR@95.

    ``candidates``: {name: (adv, clean, noisy)}; ``detector(seed)`` makes the
    regression (any fit / score detector).  Returns the chosen name, its
    fitted detector, the validation TNRs and the test AUROC.  Needs at least
    40 selected images: with fewer than 4 per block in the validation part,
    the reference's slicing can leave the regression without an
    adversarial training row.
    """
    if not candidates:
        raise ValueError("no candidate characteristics to evaluate")
    best = None
    tnrs = {}
    for name, blocks in candidates.items():
        x, y = _stack(_permuted(blocks, perm))
        n = len(x) // 3
        if n < MIN_SELECTED:
            raise ValueError(f"only {n} selected images; the protocol needs at least {MIN_SELECTED} (its 10% "
                             "validation part must hold 4 images per block)")
        fit, val, test = block_split(n)
        det = detector(seed).fit(x[fit], y[fit])
        tnrs[name] = tnr_at_tpr95(y[val], det.score(x[val]))
        if best is None or tnrs[name] > tnrs[best[0]]:
            best = (name, det, x[test], y[test])
    name, det, xt, yt = best
    return {"chosen": name, "detector": det, "val_tnr": tnrs, "auroc": float(roc_auc_score(yt, det.score(xt)))}


def heldout_auroc(det, blocks, perm) -> float:
    """AUROC of a fitted regression on the test part of another attack's characteristics."""
    x, y = _stack(_permuted(blocks, perm))
    _, _, test = block_split(len(x) // 3)
    return float(roc_auc_score(y[test], det.score(x[test])))




def run_protocol(chars: Mapping[str, Mapping[str, Sequence]], *, runs: int = 1, seed: int = 0,
                 known: str = "fgsm", detector: Callable[[int], object] = LogisticDetector) -> dict:
    """Known- and unknown-attack AUROCs over ``runs`` reshuffles.

    ``chars``: {attack: {candidate: (adv, clean, noisy)}}.  Known: each
    attack fitted and tested on itself.  Unknown: fitted on ``known`` (when
    present), tested on every other attack.  Run r permutes each attack's
    images with ``default_rng([seed, r])``.  Returns
    ``{"known": {attack: {...}}, "unknown": {attack: {...}}}`` with per-run
    AUROCs, their mean and (population) std, and the chosen candidates.
    """
    check_int(runs, "runs")
    known_res: dict = {a: {"aurocs": [], "chosen": []} for a in chars}
    unknown_res: dict = {a: {"aurocs": [], "chosen": []} for a in chars if a != known} if known in chars else {}

    def n_of(a):
        return len(next(iter(chars[a].values()))[0])

    for r in range(runs):
        perms = {a: np.random.default_rng([seed, r]).permutation(n_of(a)) for a in chars}
        fitted = {}
        for a, cands in chars.items():
            res = fit_choose(cands, perms[a], seed, detector)
            fitted[a] = res
            known_res[a]["aurocs"].append(res["auroc"])
            known_res[a]["chosen"].append(res["chosen"])
        for a in unknown_res:
            src = fitted[known]
            unknown_res[a]["aurocs"].append(heldout_auroc(src["detector"], chars[a][src["chosen"]], perms[a]))
            unknown_res[a]["chosen"].append(src["chosen"])
    for d in (known_res, unknown_res):
        for v in d.values():
            v["mean"], v["std"] = float(np.mean(v["aurocs"])), float(np.std(v["aurocs"]))
    return {"known": known_res, "unknown": unknown_res}


__all__ = ["MIN_SELECTED", "LogisticDetector", "block_split", "fit_choose", "noise_sigma", "noisy_twins", "run_protocol", "select",
           "heldout_auroc", "tnr_at_tpr95"]
