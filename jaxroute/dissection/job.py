"""Dissection into a resumable output folder, one sub-folder per layer and condition.

Layout::

    OUT/<layer>/config.json            what determines the results (model, weights, concept data
                                       fingerprint, layer, settings); a folder written with other
                                       arguments is refused, not mixed
    OUT/<layer>/<condition>/quantile.npy   the thresholds T_k used
    OUT/<layer>/<condition>/tally.csv      per-unit rows like NetDissect-Lite's
    OUT/<layer>/<condition>/result.json    the summary (units, detectors, detector_ratio, ...)

``condition`` is ``clean`` or ``fgsm-eps<eps>-<recomputed|reused>``.  Every
result is keyed by its layer and by the concept data (a CRC of its CSV files),
so a cache can never hand one layer's or one data set's results to another.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jaxroute.dissection.broden import Broden
from jaxroute.dissection.dissect import DissectConfig, LayerResult, dissect, tally_csv
from jaxroute.utils.cache import check_cache_config
from jaxroute.utils.io import atomic_save_npz, atomic_write_json, atomic_write_text, atomic_write_with


def condition_name(attack: str, eps: float | None, reuse_thresholds: bool) -> str:
    if attack == "none":
        return "clean"
    return f"{attack}-eps{eps:.6g}-{'reused' if reuse_thresholds else 'recomputed'}"


def layer_key(model_desc: Mapping, broden: Broden, layer: str, config: DissectConfig) -> dict:
    return {"model": dict(model_desc), "concepts": broden.fingerprint(), "layer": layer,
            "quantile": config.quantile, "iou_threshold": config.iou_threshold, "rules": config.rules,
            "compare": config.comparison}


def _save(folder: Path, res: LayerResult) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_with(folder / "quantile.npy", lambda f: np.save(f, res.thresholds))
    atomic_write_text(folder / "tally.csv", tally_csv(res))
    atomic_save_npz(folder / "tally.npz", labels=res.tally.labels, units=res.tally.units, both=res.tally.both,
                    iou=res.iou, best_cat=res.best_cat, score=res.score,
                    label=res.label, thresholds=res.thresholds, image_max=res.tally.image_max)
    summary = res.summary()
    atomic_write_json(folder / "result.json", summary)  # written last: its presence marks a finished result
    return summary


def transform_for(model, attack: str, eps: float | None):
    """The image transform of a condition: None (clean) or untargeted FGSM on the model's prediction."""
    if attack == "none":
        return None
    if attack != "fgsm":
        raise ValueError(f"attack must be 'none' or 'fgsm', got {attack!r}")
    from jaxroute.attacks import FGSMConfig, fgsm

    cfg = FGSMConfig(eps=eps)
    return lambda x: fgsm(model.logits, x, config=cfg).adv


def dissect_to_dir(model, broden: Broden, layers: Sequence[str], out, *, model_desc: Mapping,
                   config: DissectConfig = DissectConfig(), attack: str = "none", eps: float | None = None,
                   reuse_thresholds: bool = False, log=None) -> dict[str, dict]:
    """Dissect ``layers`` under one condition into ``out`` (see the module docstring); resumable.

    With an attack and ``reuse_thresholds``, the clean thresholds are used
    (computed first if the clean result is not there yet).  Returns
    ``{layer: summary}``.
    """
    layers = model.spec.check_points(layers)
    if attack != "none" and (eps is None or not 0 < eps <= 1):  # also refuses NaN and inf
        raise ValueError(f"attack {attack!r} needs eps in (0, 1] pixels, got {eps!r}")
    out = Path(out)
    for layer in layers:
        check_cache_config(out / layer.replace("/", "_"), layer_key(model_desc, broden, layer, config))
    cond = condition_name(attack, eps, reuse_thresholds)
    done = {l: out / l.replace("/", "_") / cond / "result.json" for l in layers}
    todo = [l for l in layers if not done[l].exists()]
    if todo:
        thresholds = None
        if attack != "none" and reuse_thresholds:
            dissect_to_dir(model, broden, todo, out, model_desc=model_desc, config=config, log=log)
            thresholds = {l: np.load(out / l.replace("/", "_") / "clean" / "quantile.npy") for l in todo}
        if log:
            log(f"dissecting {', '.join(todo)} ({cond}) on {len(broden)} concept images")
        results = dissect(model, broden, todo, config, transform=transform_for(model, attack, eps),
                          thresholds=thresholds)
        for l, r in results.items():
            _save(out / l.replace("/", "_") / cond, r)
    return {l: json.loads(done[l].read_text()) for l in layers}
