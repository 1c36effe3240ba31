"""Adversarial images as an interpretability probe (Dong et al., arXiv:1708.05493): the whole analysis.

:func:`probe` runs, for one model, real test images and their targeted
adversarial images:

* neuron consistency (Sec. 2.2): LC, CS1, CS2 of every channel of every gate
  point (:mod:`jaxroute.analysis.neurons`) and their Spearman correlations;
* the feature-space ratios r1, r2 (Eqs. 6-7) at one gate point φ, with the
  real-image control whose means are 1 by construction
  (:mod:`jaxroute.analysis.representation`);
* detection (Sec. 2.4): class-conditional Gaussians of φ fitted on training
  images, each image scored by log p(φ(x) | ŷ) with ŷ the model's prediction;
  AUC of real (high density) against adversarial.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.analysis.neurons import check_reduce, check_top_frac, neuron_scores, stack_responses
from jaxroute.analysis.representation import class_pair_means, control_ratios, distance_ratios
from jaxroute.utils.devices import map_batches


def check_adversarial_set(adv: dict, model) -> dict:
    """The arrays of a targeted adversarial set (``jaxroute attack`` output), checked against the model."""
    missing = [k for k in ("images", "labels", "target") if k not in adv]
    if missing:
        raise ValueError(f"the adversarial set lacks {missing}: it must come from a targeted attack "
                         "(jaxroute attack --method ensemble, or --target least_likely|random)")
    shape = tuple(np.shape(adv["images"])[1:])
    if shape != model.input_shape:
        raise ValueError(f"adversarial images have shape {shape}, model {model.name} expects {model.input_shape}")
    n = len(adv["images"])
    for k in ("labels", "target"):
        if np.shape(adv[k]) != (n,):
            raise ValueError(f"adversarial {k} must have one entry per image ({n}), got shape {np.shape(adv[k])}")
    t = np.asarray(adv["target"])
    if n == 0 or t.min() < 0 or t.max() >= model.num_classes:
        raise ValueError("the adversarial set has no targets in [0, classes) (an untargeted attack, or empty); "
                         "the probe needs targeted adversarial images")
    return adv


def responses(model, images, *, point: str, reduce: str = "max", batch_size: int = 128) -> dict[str, np.ndarray]:
    """Per image: every neuron's response (N, D), the flattened features at ``point`` and the logits."""
    model.spec.check_points(point)
    check_reduce(reduce)

    @jax.jit
    def one(x):
        cap = model.capture(x)
        return {"stats": stack_responses(cap.acts, model.spec.names, reduce), "phi": cap.acts[point].reshape(x.shape[0], -1), "logits": cap.logits}

    return map_batches(lambda i, x: one(jnp.asarray(x)), (np.asarray(images, np.float32),),
                       min(batch_size, len(images)))


def gaussian_auc(train_phi, train_labels, real_phi, real_pred, adv_phi, adv_pred, num_classes: int, *,
                 chunk: int = 2048) -> float:
    """AUC of log p(φ(x) | ŷ) under class-conditional Gaussians fitted on training features (real = positive)."""
    from sklearn.metrics import roc_auc_score

    from jaxroute.detection.gaussian import fit_class_gaussians, log_density

    g = fit_class_gaussians(np.asarray(train_phi, np.float64), np.asarray(train_labels), num_classes,
                            covariance="per_class", shrinkage="ledoit_wolf")

    def score(phi, pred):  # in row chunks: the solves hold (D, rows) per class
        phi, pred = np.asarray(phi), np.asarray(pred)
        return np.concatenate([np.asarray(log_density(g, phi[s:s + chunk]))[np.arange(len(pred[s:s + chunk])),
                                                                             pred[s:s + chunk]]
                               for s in range(0, len(phi), chunk)])

    s_real, s_adv = score(real_phi, real_pred), score(adv_phi, adv_pred)
    y = np.r_[np.ones(len(s_real)), np.zeros(len(s_adv))]
    return float(roc_auc_score(y, np.r_[s_real, s_adv]))


def _rank_corr(a, b) -> float | None:
    """Spearman's ρ, or None where it is undefined (a constant input: e.g. every LC = 1 when each
    top set is a single image)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def probe(model, real, adv: dict, corr, *, train=None, point: str | None = None, top_frac: float = 0.01,
          reduce: str = "max", batch_size: int = 128, chunk: int = 1024) -> tuple[dict, dict]:
    """The analysis of the module docstring.  Returns (summary, arrays).

    ``real`` a Dataset of real images, ``adv`` the arrays of a targeted
    adversarial set (``images``, ``labels`` = original classes, ``target``);
    ``corr`` the (K, K) class correlation; ``train`` a Dataset for the Gaussian
    detector (skipped when None); ``point`` the gate point of φ (default: the
    last one).
    """
    check_top_frac(top_frac)
    check_adversarial_set(adv, model)
    k = model.num_classes
    corr = np.asarray(corr, np.float64)
    if corr.shape != (k, k):
        raise ValueError(f"the class correlation is {corr.shape}, the model has {k} classes")
    point = model.spec.names[-1] if point is None else point
    model.spec.check_points(point)
    rr = responses(model, real.images, point=point, reduce=reduce, batch_size=batch_size)
    ra = responses(model, adv["images"], point=point, reduce=reduce, batch_size=batch_size)
    y, ya, ta = np.asarray(real.labels), np.asarray(adv["labels"]), np.asarray(adv["target"])
    ns = neuron_scores(rr["stats"], y, ra["stats"], ya, ta, corr.astype(np.float32), top_frac=top_frac)
    lc, cs1, cs2 = (np.asarray(a, np.float64) for a in (ns.lc, ns.cs1, ns.cs2))
    pm = class_pair_means(rr["phi"], y, k, chunk=chunk)
    r1, r2 = distance_ratios(ra["phi"], ya, ta, rr["phi"], y, k, pair_means=pm, chunk=chunk)
    c1, c2 = control_ratios(rr["phi"], y, k, chunk=chunk)
    summary = {
        "n_real": int(len(y)), "n_adv": int(len(ya)), "n_neurons": int(len(lc)), "point": point,
        "top_frac": top_frac, "reduce": reduce,
        "lc_mean": float(lc.mean()), "cs1_mean": float(cs1.mean()), "cs2_mean": float(cs2.mean()),
        "spearman_lc_cs1": _rank_corr(lc, cs1), "spearman_lc_cs2": _rank_corr(lc, cs2),
        "r1_mean": float(np.nanmean(r1)), "r2_mean": float(np.nanmean(r2)),
        "r1_control_mean": float(np.nanmean(c1)), "r2_control_mean": float(np.nanmean(c2)),
        "adv_success": float(np.mean(ra["logits"].argmax(-1) == ta)),
        "gaussian_auc": None,
    }
    if train is not None:
        rt = responses(model, train.images, point=point, reduce=reduce, batch_size=batch_size)
        summary["gaussian_auc"] = gaussian_auc(rt["phi"], train.labels, rr["phi"], rr["logits"].argmax(-1),
                                               ra["phi"], ra["logits"].argmax(-1), k)
    arrays = {"lc": lc, "cs1": cs1, "cs2": cs2, "p": np.asarray(ns.p), "q": np.asarray(ns.q),
              "qt": np.asarray(ns.qt), "r1": r1, "r2": r2, "r1_control": c1, "r2_control": c2}
    return summary, arrays
