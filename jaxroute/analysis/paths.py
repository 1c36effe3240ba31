"""Properties of routed sets: dense paths and mean class paths.

A routed set is the dict the routing job's shards load into: ``cdrp`` (N, D),
``label``, ``pred`` (the full model's prediction), ``loss`` (the kept
iterate's DGR loss) and ``fell_back`` (DGR found no gated iterate that keeps
the prediction and returned all-ones gates).
"""
from __future__ import annotations

import numpy as np

from jaxroute.analysis.divergence import class_mean_paths


def dense(d: dict) -> np.ndarray:
    """Images whose kept gates are all > 0.

    DGR keeps the lowest-loss iterate that still gives the full model's top-1; for these
    images that was an early, dense one.  They are not fallbacks (the gates are not all
    ones), but they carry no sparsity, so analyses report them apart.
    """
    return np.all(d["cdrp"] > 0, axis=1)


def path_stats(d: dict) -> dict:
    """Dense-path fraction, the model's accuracy on dense vs other paths, and how many kept gate
    sets have a loss above 1,000 (gated logits blown up by gates near the clip maximum).

    An accuracy is None where its group is empty (strict JSON has no NaN).
    """
    dn, correct = dense(d), d["pred"] == d["label"]
    return {"dense_fraction": float(dn.mean()),
            "accuracy_dense": float(correct[dn].mean()) if dn.any() else None,
            "accuracy_not_dense": float(correct[~dn].mean()) if (~dn).any() else None,
            "loss_above_1000": int(np.sum(d["loss"] > 1000))}


def class_paths_from(real: dict, k: int) -> tuple[np.ndarray, list[str]]:
    """(K, D) mean CDRP per class and notes on the classes where it had to fall back.

    A class's path is the mean over its real images that the model classifies correctly
    and DGR routed (not fallen back to all ones): misclassified images follow another
    class's path, and all-ones gates are no path at all.  A class with no such image
    takes the mean over all its images instead (noted); an absent class stays NaN.
    """
    correct = (real["pred"] == real["label"]) & ~real["fell_back"]
    paths = class_mean_paths(real["cdrp"][correct], real["label"][correct], k)
    notes = []
    for c in range(k):
        if np.isnan(paths[c]).any() and np.any(real["label"] == c):
            paths[c] = real["cdrp"][real["label"] == c].mean(0)
            notes.append(f"class {c}: no correctly classified image, mean over all its images")
    return paths, notes
