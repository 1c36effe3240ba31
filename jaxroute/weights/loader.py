"""One entry point to get a model with weights: by name, orbax checkpoint or PyTorch file."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxroute.models.gated import GatedModel
from jaxroute.models.meta import default_meta
from jaxroute.models.registry import create_model, init_model, model_card
from jaxroute.weights.checkpoint import check_tree, read_meta, restore_variables
from jaxroute.weights.torch_import import load_torch_state_dict, torch_to_flax

TORCH_SUFFIXES = (".th", ".pt", ".pth", ".tar", ".bin")


def abstract_variables(module, input_shape) -> dict:
    """Shapes of the module's variables, without allocating or computing anything."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)


def load_model(name: str | None = None, weights: str | os.PathLike | None = None, *,
               key: jax.Array | None = None, **overrides) -> GatedModel:
    """Load a model as a :class:`~jaxroute.models.GatedModel`.

    * ``weights`` is a jaxroute checkpoint directory: its metadata decides the
      architecture; a ``name`` that disagrees is an error.
    * ``weights`` is a PyTorch file (``.th/.pt/.pth``): converted with
      :func:`torch_to_flax` for architecture ``name`` (needs torch).
    * ``weights`` is None: random initialisation from ``key`` (for training).

    ``overrides`` (``gate_placement``, ``num_classes``, ``mean``, ``std``)
    change module fields; ``gate_placement`` may differ from the checkpoint's
    (it does not change the weights).
    """
    if weights is not None and Path(weights).is_dir():
        meta = read_meta(weights)
        if name is not None and name != meta.arch:
            raise ValueError(f"checkpoint {weights} holds a {meta.arch!r} model, not {name!r}")
        model_card(meta.arch)  # unknown architecture -> clear error
        if overrides:
            meta = dataclasses.replace(meta, **{k: (tuple(v) if isinstance(v, list) else v)
                                                for k, v in overrides.items()})
        module = create_model(meta.arch, **meta.module_overrides(), **_saved_module_fields(weights, meta))
        variables = restore_variables(weights, abstract_variables(module, meta.input_shape))
        return GatedModel(module, variables, meta)
    if name is None:
        raise ValueError("a model name is needed (unless weights is a jaxroute checkpoint directory)")
    meta = default_meta(name, source=str(weights or "random-init"), **overrides)
    module = create_model(name, **meta.module_overrides())
    target = abstract_variables(module, meta.input_shape)
    if weights is None:
        if key is None:
            raise ValueError("random initialisation needs an explicit PRNG key (key=jax.random.key(...))")
        variables = init_model(module, key, meta.input_shape)
        return GatedModel(module, jax.device_get(variables), meta)
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"do not know how to read weights {path}: expected a jaxroute checkpoint "
                         f"directory or a PyTorch file ({', '.join(TORCH_SUFFIXES)})")
    variables = torch_to_flax(load_torch_state_dict(path), target)
    check_tree(target, variables)
    return GatedModel(module, variables, meta)


def _saved_module_fields(path, meta) -> dict:
    """Module fields a checkpoint keeps beside its metadata: a decoupled model's controller
    reduction γ and SemHash mode (``decouple.json``, :func:`jaxroute.decoupling.model.save_decoupled`),
    when it is loaded as a decoupled model."""
    from jaxroute.decoupling.model import DECOUPLE_FILE

    f = Path(path) / DECOUPLE_FILE
    if meta.gate_placement != "decouple" or not f.is_file():
        return {}
    fields = json.loads(f.read_text())
    return {"controller_reduction": int(fields["reduction"]), "semhash": fields["semhash"]}
