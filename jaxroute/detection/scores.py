"""Training-free one-number scores of real vs adversarial images.

Before trusting a trained detector, ask what a single number already tells
apart: if the penultimate activations' norm or the top logit separates real
from adversarial images, a detector on those features has an easy task, and
a CDRP detector's edge over it means little.  Each score maps a routed set
(``cdrp``, ``features``, ``full_logits``) to one value per image.
"""
from __future__ import annotations

import numpy as np


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    """Largest softmax probability per row (stable: logits shifted by their maximum)."""
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).max(1)


SCALAR_SCORES = {
    "penultimate L2 norm": lambda d: np.linalg.norm(d["features"].reshape(len(d["features"]), -1), axis=1),
    "max logit": lambda d: d["full_logits"].max(1),
    "max softmax probability": lambda d: _softmax_max(d["full_logits"]),
    "CDRP fraction of gates > 0": lambda d: np.mean(d["cdrp"] > 0, axis=1),
    "CDRP L1 norm": lambda d: np.abs(d["cdrp"]).sum(1),
}


def scalar_aucs(real: dict, adv: dict) -> dict[str, float]:
    """AUC (adversarial = positive) of each score in :data:`SCALAR_SCORES` on a real and an
    adversarial set; below 0.5: the score is lower for adversarial images."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(real["cdrp"])), np.ones(len(adv["cdrp"]))]
    return {k: float(roc_auc_score(y, np.r_[f(real), f(adv)])) for k, f in SCALAR_SCORES.items()}
