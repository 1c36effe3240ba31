"""Routing a data set: the routers by name, and the extraction job writing their paths.

``route_dataset`` runs a router through the generic extraction job
(:mod:`jaxroute.extraction`), so path extraction is resumable, multi-device
and multi-process; each shard holds the :class:`~jaxroute.routing.Route`
fields plus ``features`` (the penultimate activations of the model as it runs,
``model.capture(x).features``: the baseline feature of the detectors), and
``summary.json`` the Table-1 metrics.

Routers (:data:`ROUTERS`): ``dgr``, ``awr``, ``aar`` and ``controller`` (the
calculation paths of a decoupled model, :mod:`jaxroute.routing.controller`).  A
router's config may define ``check_model(model)``, raising for a model the router
cannot route; :func:`route_outputs` calls it before any work.

A decoupled model (``gate_placement="decouple"``, from ``jaxroute decouple``)
routed with ``dgr``, ``awr`` or ``aar``: its gate points are the controlled convs
(``layerS.B.conv1``/``conv2``), so the CDRPs have the layout of its calculation
paths and compare with them entry by entry; the router's gates replace the
controllers' (``model.logits(x, gates)``), so the full model (all gates 1) is the
decoupled model's backbone with every filter, as in the ``controller`` route;
``features`` are those of the decoupled network as it runs (its controllers on).
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from jaxroute.data import Dataset
from jaxroute.routing.controller import ControllerConfig, controller_route
from jaxroute.extraction import BatchPlan, load_manifest, load_shards, run_extraction
from jaxroute.models.gates import GateSpec
from jaxroute.routing.dgr import DGRConfig, dgr_route, dgr_route_pair
from jaxroute.routing.metrics import routing_metrics
from jaxroute.routing.pruning import PruneConfig, aar_route, awr_route
from jaxroute.utils.conv_grads import loop_friendly
from jaxroute.utils.io import atomic_write_text
from jaxroute.utils.registry import registry_config

# name -> (router, its config class); every router: router(model, x, *, config) -> Route
ROUTERS: dict[str, tuple[Callable, type]] = {
    "dgr": (dgr_route, DGRConfig),
    "awr": (awr_route, PruneConfig),
    "aar": (aar_route, PruneConfig),
    "controller": (controller_route, ControllerConfig),
}
SUMMARY = "summary.json"


def router_config(method: str, config=None):
    """The config of router ``method``: ``config`` itself (checked), or the defaults."""
    return registry_config(ROUTERS, method, config, "routing method")


def route_outputs(model, method: str = "dgr", config=None, momentum_from: np.ndarray | None = None) -> Callable:
    """Jitted ``fn(images, labels, index) -> {Route fields..., features}`` for the extraction job.

    Also usable alone: ``route_outputs(model)(x, None, None)``.

    ``momentum_from`` (DGR only; ``(N, H, W, C)`` images indexed by the sample
    index): sample i is routed after ``momentum_from[i]`` with the optimizer
    state carried over (:func:`~jaxroute.routing.dgr.dgr_route_pair`), as the
    official DGR release routes an adversarial image after its real twin.
    The default (None) starts every image fresh, as the paper describes.

    Raises at once (before anything is traced or written) when the router's config
    refuses the model (``config.check_model``, e.g. ``controller`` on a plain model).
    """
    router = ROUTERS[method][0]
    config = router_config(method, config)
    check = getattr(config, "check_model", None)
    if check is not None:
        check(model)
    features = loop_friendly(lambda x: model.capture(x).features)  # the conv formulations of the routing
    if momentum_from is not None:
        if method != "dgr":
            raise ValueError(f"momentum_from applies to DGR's SGD momentum only, not to {method!r}")
        previous = jax.numpy.asarray(momentum_from, jax.numpy.float32)

        def fn(x, labels=None, index=None):
            _, r = dgr_route_pair(model, previous[index], x, config=config)
            return {**r._asdict(), "features": features(x)}
    else:
        def fn(x, labels=None, index=None):
            r = router(model, x, config=config)
            return {**r._asdict(), "features": features(x)}

    return jax.jit(fn)


def route_dataset(model, dataset: Dataset, out: str | os.PathLike, *, plan: BatchPlan, method: str = "dgr",
                  config=None, source: Mapping[str, Any] | None = None, progress: bool = True,
                  process_index: int | None = None, process_count: int | None = None,
                  momentum_from: np.ndarray | None = None, log: Callable[[str], Any] | None = None) -> dict:
    """Route ``dataset`` into resumable shards under ``out``; returns (and writes) the summary.

    ``source`` describes where model and data came from (weights path, data
    spec, split, limit): recorded in the manifest and compared on resume.
    ``momentum_from``: see :func:`route_outputs` (the manifest records its CRC-32).
    """
    config = router_config(method, config)
    job = {"model": model.name, "gate_placement": model.gate_placement, **dict(source or {}),
           "method": method, "config": dataclasses.asdict(config)}
    if momentum_from is not None:
        if len(momentum_from) != len(dataset.images):
            raise ValueError(f"momentum_from has {len(momentum_from)} images, the data set {len(dataset.images)}")
        job["momentum_from_crc32"] = zlib.crc32(np.ascontiguousarray(momentum_from, np.float32).data)
    extra = {"layout": model.spec.layout(), "cdrp_size": model.spec.size,
             "model_meta": {"arch": model.name, "mean": list(model.meta.mean), "std": list(model.meta.std),
                            "num_classes": model.num_classes}}
    res = run_extraction(route_outputs(model, method, config, momentum_from), dataset, out, job=job, plan=plan, extra=extra,
                         progress=progress, desc=f"route {method}", process_index=process_index,
                         process_count=process_count, log=log)
    timing = {"seconds": res.seconds, "routed_now": res.computed, "images_per_s": res.samples_per_s,
              "input_images_per_s": res.input_per_s, "routing_images_per_s": res.compute_per_s}
    pi = jax.process_index() if process_index is None else process_index
    return summarize(out, model.spec, timing, write=(pi == 0))


def summarize(out: str | os.PathLike, spec: GateSpec, timing: dict | None = None, write: bool = True) -> dict:
    """Metrics over all shards of ``out`` (+ throughput of this run), written to summary.json."""
    manifest = load_manifest(out)
    s = load_shards(out)
    if len(s["index"]) != manifest["num_samples"] or np.any(np.diff(s["index"]) != 1):
        raise RuntimeError(f"{out}: shards hold {len(s['index'])} samples, manifest says "
                           f"{manifest['num_samples']} (job unfinished?)")
    m = routing_metrics(s["cdrp"], s["full_logits"], s["gated_logits"], s["label"], spec)
    m["fallback_fraction"] = float(np.mean(s["fell_back"]))
    m["method"] = manifest["job"]["method"]
    if timing:
        m.update(timing)
    if write:
        atomic_write_text(Path(out) / SUMMARY, json.dumps(m, indent=1))
    return m
