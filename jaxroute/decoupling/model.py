"""Decoupled models: a backbone with ``gate_placement="decouple"`` and its controllers.

The backbone's parameter names are those of the plain model, so a pretrained
checkpoint (PyTorch file or jaxroute directory) loads strictly into it; the
controllers (``.../controllerK/{fc1,fc2,fc_class}``) are new parameters,
initialised as the official code does.  Gate points: ``layerS.B.conv1`` and
``layerS.B.conv2`` on the CIFAR ResNets, ``conv2`` and ``conv3`` on digits_cnn.

An input's *calculation path* is its gate tree z (eval mode, z = 1(Ḡ > 0));
``flatten_gates(model.spec, z)`` concatenates it in forward order (672 entries
for ResNet-20).  ``model.logits(x)`` runs the controllers; ``model.logits(x, gates)``
overrides their gates (e.g. all ones: the plain backbone).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxroute.decoupling.controller import SEMHASH_MODES
from jaxroute.models.base import DECOUPLE_PLACEMENT
from jaxroute.models.gated import GatedModel
from jaxroute.models.gates import flatten_gates
from jaxroute.models.registry import create_model, init_model
from jaxroute.utils.checks import check_int
from jaxroute.utils.devices import map_batches
from jaxroute.weights.checkpoint import check_tree
from jaxroute.weights.loader import load_model

DECOUPLE_MODELS = ("resnet20", "resnet32", "resnet56", "digits_cnn")
DECOUPLE_FILE = "decouple.json"   # controller fields of a saved decoupled model
CONTROLLER_TAG = "controller"


def check_decouple_model(name: str) -> None:
    if name not in DECOUPLE_MODELS:
        raise ValueError(f"network decoupling supports {', '.join(DECOUPLE_MODELS)}; got {name!r}")


def decouple_module(name: str, reduction: int = 4, semhash: str = "half", **overrides):
    """The Flax module of architecture ``name`` with controllers (``gate_placement="decouple"``)."""
    check_decouple_model(name)
    reduction = check_int(reduction, "controller reduction γ")   # a Python int for decouple.json
    if semhash not in SEMHASH_MODES:
        raise ValueError(f"semhash must be one of {SEMHASH_MODES}, got {semhash!r}")
    overrides = {**overrides, "gate_placement": DECOUPLE_PLACEMENT}
    return create_model(name, controller_reduction=reduction, semhash=semhash, **overrides)


def is_controller_path(path: tuple[str, ...]) -> bool:
    return any(p.startswith(CONTROLLER_TAG) for p in path)


def split_controllers(params) -> tuple[dict, dict]:
    """``(backbone, controllers)``: a parameter tree cut into the plain model's part and the rest."""
    flat = flatten_dict(dict(params))
    back = {k: v for k, v in flat.items() if not is_controller_path(k)}
    ctrl = {k: v for k, v in flat.items() if is_controller_path(k)}
    return unflatten_dict(back), unflatten_dict(ctrl)


def controller_labels(params) -> dict:
    """A tree of ``"controller"`` / ``"backbone"`` labels (for ``optax.multi_transform``)."""
    flat = flatten_dict(dict(params))
    return unflatten_dict({k: ("controller" if is_controller_path(k) else "backbone") for k in flat})


def decoupled_model(name: str | None = None, weights: str | os.PathLike | None = None, *,
                    key: jax.Array, reduction: int = 4, semhash: str = "half") -> GatedModel:
    """A decoupled :class:`GatedModel`.

    ``weights``: a plain pretrained model (PyTorch file or jaxroute directory;
    loaded strictly, controllers initialised from ``key``), a saved decoupled
    model (restored as is; ``name``, if given, must match), or None (random backbone).
    """
    if weights is not None and Path(weights).is_dir() and (Path(weights) / DECOUPLE_FILE).is_file():
        fields = json.loads((Path(weights) / DECOUPLE_FILE).read_text())
        module = decouple_module(fields["arch"], fields["reduction"], fields["semhash"])
        from jaxroute.weights.checkpoint import read_meta, restore_variables
        from jaxroute.weights.loader import abstract_variables

        meta = read_meta(weights)
        if name is not None and name != meta.arch:
            raise ValueError(f"checkpoint {weights} holds a decoupled {meta.arch!r} model, not {name!r}")
        variables = restore_variables(weights, abstract_variables(module, meta.input_shape))
        return GatedModel(module, variables, meta)
    if name is None:
        raise ValueError("a model name is needed unless weights is a saved decoupled model")
    check_decouple_model(name)
    plain = load_model(name, weights, key=key)
    if plain.gate_placement == DECOUPLE_PLACEMENT:
        raise ValueError(f"{weights} is a decoupled model without its {DECOUPLE_FILE}; it cannot be restored")
    module = decouple_module(name, reduction, semhash, num_classes=plain.num_classes,
                             mean=plain.meta.mean, std=plain.meta.std)
    fresh = init_model(module, key, plain.input_shape)
    backbone, controllers = split_controllers(fresh["params"])
    check_tree(backbone, plain.variables["params"], what=f"weights {weights}")
    params = unflatten_dict({**flatten_dict(dict(plain.variables["params"])), **flatten_dict(controllers)})
    variables = {**plain.variables, "params": params}
    meta = dataclasses.replace(plain.meta, gate_placement=DECOUPLE_PLACEMENT)
    return GatedModel(module, jax.device_get(variables), meta)


def save_decoupled(path: str | os.PathLike, model: GatedModel, overwrite: bool = False) -> Path:
    """Save a decoupled model as a jaxroute checkpoint (``variables/``, ``jaxroute.json``) plus
    ``decouple.json`` (the controller fields), into ``path`` even when it holds other files
    (a training run's state); ``load_model`` and :func:`decoupled_model` read it."""
    import orbax.checkpoint as ocp

    from jaxroute.utils.io import atomic_write_text
    from jaxroute.weights.checkpoint import META_FILE

    path = Path(path).absolute()
    if (path / "variables").exists() or (path / META_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{path} already holds a model (pass overwrite=True / --overwrite)")
        (path / META_FILE).unlink(missing_ok=True)
        shutil.rmtree(path / "variables", ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "variables", jax.tree_util.tree_map(np.asarray, dict(model.variables)))
    ckptr.wait_until_finished()
    (path / DECOUPLE_FILE).write_text(json.dumps(
        {"arch": model.meta.arch, "reduction": model.module.controller_reduction, "semhash": model.module.semhash}))
    atomic_write_text(path / META_FILE, json.dumps(model.meta.to_json(), indent=2))  # last: marks it complete
    return path


def controller_outputs(model: GatedModel, x: jax.Array) -> dict:
    """Eval-mode controller outputs ``{gate_point: {"z", "logits", "mi_logits", "ybar"}}``."""
    _, cap = model.module.apply(model.variables, x, capture=True)
    return cap["decouple"]


def calculation_paths(model: GatedModel, x: jax.Array) -> dict:
    """The gate tree z of every input, ``{gate_point: (B, N)}`` in {0, 1} (eval mode)."""
    return {p: e["z"] for p, e in controller_outputs(model, x).items()}


def path_features(model: GatedModel, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One eval-mode forward: ``(paths, features, logits)`` -- the flattened calculation paths
    (B, D) in the order of ``model.spec``, the penultimate features (B, F) and the logits."""
    logits, cap = model.module.apply(model.variables, x, capture=True)
    z = {p: e["z"] for p, e in cap["decouple"].items()}
    return flatten_gates(model.spec, z), cap["features"].reshape(x.shape[0], -1), logits


def dataset_paths(model: GatedModel, images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """:func:`path_features` over a whole image array in fixed-shape batches:
    ``{"paths": (N, D) uint8, "features": (N, F), "pred": (N,)}``."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != tuple(model.input_shape):
        raise ValueError(f"images must be (N, {', '.join(map(str, model.input_shape))}), got {images.shape}")
    fn = jax.jit(lambda x: path_features(model, x))

    def one(_, x):
        paths, feats, logits = fn(x)
        return {"paths": paths, "features": feats, "pred": jnp.argmax(logits, -1)}

    out = map_batches(one, (images,), min(batch_size, len(images)))
    out["paths"] = (out["paths"] > 0.5).astype(np.uint8)
    return out


def filter_states(z: dict) -> dict:
    """Per layer and in total: filters *energetic* (on for every input), *silent* (off for
    every input) and *dynamic* (the rest), from a gate tree of many inputs (paper, Fig. 4)."""
    per_layer = {}
    for p, v in z.items():
        v = np.asarray(v) > 0.5
        on, off = v.all(0), (~v).all(0)
        per_layer[p] = {"energetic": int(on.sum()), "silent": int(off.sum()),
                        "dynamic": int((~on & ~off).sum())}
    total = {k: sum(d[k] for d in per_layer.values()) for k in ("energetic", "silent", "dynamic")}
    return {**total, "per_layer": per_layer}
