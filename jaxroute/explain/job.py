"""Saliency maps of a data set through the extraction job, with full weights or each class's subnetwork.

``explain_dataset`` runs each method through the generic extraction job
(:mod:`jaxroute.extraction`: resumable, multi-device, multi-process) into
``OUT/METHOD/`` (manifest and shards), then gathers the shards into
``OUT/METHOD/SPLIT.npz`` with

* ``attributions`` (N, H, W, C) float32, raw, with respect to the [0, 1] pixel input;
* ``maps`` (N, H, W) float32, the 2-D map (:mod:`jaxroute.explain.methods`);
* ``target`` (N,) the class explained, ``label`` (N,) the true class (-1 where unknown).

Subnetworks: with ``subnets`` (K, D) -- one gate vector per class in the
model's flat gate order -- image i is explained under ``subnets[target_i]``,
every image of a batch under its own class's subnetwork in one pass.

Target: ``"label"`` explains the true class (the paper's localization
protocol), ``"pred"`` the full model's top-1 prediction.  SmoothGrad's noise
for image i is drawn from ``fold_in(key, i)`` (i its index in the data set),
so an image's map does not depend on the batch it was computed in.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.data import Dataset
from jaxroute.explain.methods import METHODS, NEEDS_KEY, method_config
from jaxroute.extraction import BatchPlan, load_manifest, load_shards, run_extraction
from jaxroute.utils.checks import check_int
from jaxroute.utils.io import atomic_save_npz

TARGET_RULES = ("label", "pred")


def explanation_outputs(model, method: str, config=None, *, subnets=None, target: str = "label",
                        key: jax.Array | None = None) -> Callable:
    """Jitted ``fn(images, labels, index) -> {attributions, maps, target}`` for the extraction job.

    ``subnets`` (K, D): explain image i under ``subnets[target_i]``; ``key``: SmoothGrad's key
    (image i uses ``fold_in(key, index_i)``).
    """
    fn_method = METHODS[method][0]
    config = method_config(method, config)
    if target not in TARGET_RULES:
        raise ValueError(f"target must be one of {TARGET_RULES}, got {target!r}")
    if method in NEEDS_KEY and key is None:
        raise ValueError(f"{method} needs an explicit PRNG key")
    subnets = None if subnets is None else jnp.asarray(subnets, jnp.float32)

    def fn(x, labels, index):
        t = labels if target == "label" else jnp.argmax(model.logits(x), axis=-1)
        t = t.astype(jnp.int32)
        gates = None if subnets is None else subnets[t]
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        ex = fn_method(model, gates, x, t, config=config, key=keys)
        return {"attributions": ex.attributions.astype(jnp.float32), "maps": ex.maps.astype(jnp.float32),
                "target": t}

    return jax.jit(fn)


def explain_dataset(model, dataset: Dataset, out: str | os.PathLike, *, plan: BatchPlan, methods,
                    configs: Mapping[str, Any] | None = None, subnets=None, target: str = "label",
                    seed: int = 0, split: str = "test", source: Mapping[str, Any] | None = None,
                    progress: bool = True, process_index: int | None = None,
                    process_count: int | None = None, log: Callable[[str], Any] | None = None) -> dict:
    """Explain ``dataset`` with each of ``methods`` into ``out/METHOD/`` (resumable); returns
    ``{method: {"npz": path, "n": count, "maps_per_s": rate of this call or None}}``.

    ``configs``: ``{method: config}`` (missing: the defaults); ``seed``: SmoothGrad's PRNG seed;
    ``source`` (weights path, data spec...) is recorded in each manifest and compared on resume.
    """
    methods = list(methods)
    configs = dict(configs or {})
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown saliency method(s) {unknown or methods}; one of {sorted(METHODS)}")
    check_int(seed, "seed", 0)
    if target == "label" and dataset.labels is None:
        raise ValueError("--target label needs a labelled data set (use --target pred)")
    if subnets is not None and tuple(np.shape(subnets)) != (model.num_classes, model.spec.size):
        raise ValueError(f"subnets must have shape {(model.num_classes, model.spec.size)}, got {np.shape(subnets)}")
    if target == "label" and dataset.labels is not None and len(dataset.labels):
        bad = np.asarray(dataset.labels)
        bad = bad[(bad < 0) | (bad >= model.num_classes)]
        if bad.size:
            raise ValueError(f"target class {int(bad[0])} is out of range for {model.name} "
                             f"({model.num_classes} classes)")
    pi = jax.process_index() if process_index is None else process_index
    results = {}
    for method in methods:
        config = method_config(method, configs.get(method))
        key = jax.random.key(seed) if method in NEEDS_KEY else None
        job = {"model": model.name, "gate_placement": model.gate_placement, **dict(source or {}),
               "method": method, "config": dataclasses.asdict(config), "target": target,
               "subnets": subnets is not None,
               "seed": seed if method in NEEDS_KEY else None}
        extra = {"num_classes": model.num_classes, "split": split}
        if subnets is not None:  # a resume with other subnetworks is refused
            extra["subnets_crc32"] = int(np.uint32(_crc(subnets)))
        fn = explanation_outputs(model, method, config, subnets=subnets, target=target, key=key)
        res = run_extraction(fn, dataset, Path(out) / method, job=job, plan=plan, extra=extra, progress=progress,
                             desc=f"explain {method}", process_index=process_index,
                             process_count=process_count, log=log)
        npz = Path(out) / method / f"{split}.npz"
        if pi == 0:
            npz = gather(Path(out) / method, split)
        results[method] = {"npz": str(npz), "n": res.manifest["num_samples"], "maps_per_s": res.samples_per_s}
    return results


def _crc(a) -> int:
    import zlib

    return zlib.crc32(np.ascontiguousarray(a, np.float32).data)


def gather(out: str | os.PathLike, split: str = "test") -> Path:
    """Write the finished shards of ``out`` as ``out/SPLIT.npz`` (``attributions``, ``maps``, ``target``,
    ``label``); refuses an unfinished job."""
    manifest = load_manifest(out)
    s = load_shards(out)
    if len(s["index"]) != manifest["num_samples"] or np.any(np.diff(s["index"]) != 1):
        raise RuntimeError(f"{out}: shards hold {len(s['index'])} samples, the manifest says "
                           f"{manifest['num_samples']} (job unfinished?)")
    path = Path(out) / f"{split}.npz"
    atomic_save_npz(path, attributions=s["attributions"], maps=s["maps"], target=s["target"].astype(np.int64),
                    label=s["label"])
    return path
