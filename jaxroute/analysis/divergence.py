"""How routing paths diverge under attack (DGR paper Sec. 4.3, Fig. 8).

For each adversarial image and each gate layer: the Pearson correlation of
its gates with (a) its original image's gates and (b) the routing path of
the class the attack reached, represented by the mean of real images'
gates of that class at that layer.  The paper finds (a) high in early
layers and falling with depth, while (b) rises with depth: the attack
re-routes the deep layers onto the target class's path.

Because (a) compares two single images and (b) compares with a class
*mean* (which is smoother, so correlations with it run higher), two
like-for-like references are available: (c) ``to_source_class``, the
adversarial gates against the mean path of the original image's class,
and (d) the correlation of real images with their own class's mean path
(:func:`layer_correlations` with ``adv = orig = real`` and ``reached =
labels``), the level a genuine member of a class reaches.

Deviation: the paper does not say how "images of the target class" enter
the correlation; we use their mean path (the experiment takes it from
held-out real images the model classifies correctly).
"""
from __future__ import annotations

import numpy as np

from jaxroute.analysis.layers import split_layers
from jaxroute.models.gates import GateSpec


def rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows; 0 where a row is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(-1) / den
    return np.where(den > 0, r, 0.0)


def class_mean_paths(cdrp: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, D) mean CDRP of the real images of each class (NaN for an absent class)."""
    cdrp, labels = np.asarray(cdrp), np.asarray(labels)
    out = np.full((num_classes, cdrp.shape[1]), np.nan)
    for k in range(num_classes):
        if np.any(labels == k):
            out[k] = cdrp[labels == k].mean(0)
    return out


def layer_correlations(adv: np.ndarray, orig: np.ndarray, reached: np.ndarray, class_paths: np.ndarray,
                       spec: GateSpec, source: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-layer correlations, each (N, L): ``to_original`` (the original image's gates),
    ``to_reached_class`` (the mean path of class ``reached``) and, when ``source`` (the
    original images' classes) is given, ``to_source_class``."""
    reached = np.asarray(reached)
    classes = reached if source is None else np.concatenate([reached, np.asarray(source)])
    if np.isnan(class_paths[classes]).any():
        raise ValueError("some reached (or source) classes have no real-image paths to compare with")
    if len(adv) != len(orig) or len(adv) != len(reached):
        raise ValueError(f"adv, orig and reached must have one row per adversarial image: "
                         f"{len(adv)}, {len(orig)}, {len(reached)}")
    a, o, t = split_layers(adv, spec), split_layers(orig, spec), split_layers(class_paths[reached], spec)
    out = {
        "to_original": np.stack([rowwise_corr(a[n], o[n]) for n in spec.names], 1),
        "to_reached_class": np.stack([rowwise_corr(a[n], t[n]) for n in spec.names], 1),
    }
    if source is not None:
        s = split_layers(class_paths[np.asarray(source)], spec)
        out["to_source_class"] = np.stack([rowwise_corr(a[n], s[n]) for n in spec.names], 1)
    return out


def attack_correlations(adv: dict, orig: dict, class_paths: np.ndarray, spec: GateSpec,
                        target: np.ndarray | None) -> dict:
    """:func:`layer_correlations` of the adversarial images whose attack worked.

    ``adv`` and ``orig`` are routed sets (``cdrp``, ``pred``, ``fell_back``; ``orig`` also
    ``label``), row i of ``adv`` the attacked version of row i of ``orig``.  An image counts
    when the model classifies its original correctly and the attack reached ``target``
    (targeted) or any other class (``target`` None, untargeted): a failed attack says
    nothing about re-routing.  Of those, images where DGR fell back to all-ones gates
    (for either image: no routing path) or whose reached class has no path are left out.
    Returns ``n`` (used), ``n_worked``, ``n_total`` and, when ``n`` > 0, ``corr``.
    """
    label = orig["label"]
    ok = orig["pred"] == label
    ok &= (adv["pred"] == target) if target is not None else (adv["pred"] != label)
    worked = int(ok.sum())
    ok &= ~(adv["fell_back"] | orig["fell_back"])
    ok &= ~np.isnan(class_paths[adv["pred"]]).any(1)
    idx = np.flatnonzero(ok)
    base = {"n": int(len(idx)), "n_total": int(len(label)), "n_worked": worked}
    if len(idx) == 0:
        return base
    c = layer_correlations(adv["cdrp"][idx], orig["cdrp"][idx], adv["pred"][idx], class_paths, spec,
                           source=label[idx])
    return {**base, "corr": c}
