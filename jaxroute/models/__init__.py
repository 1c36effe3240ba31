"""Gate-aware functional models: pick by name, gate by pytree.

The gate modules (:mod:`jaxroute.models.gates`: ``GateSpec``, flatten /
unflatten / split) need only numpy and JAX; the architectures need Flax.
Names are resolved on first use, so ``from jaxroute.models.gates import
GateSpec`` (what the numpy analysis modules do) never imports Flax.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "gates": ("GateSpec", "GateTree", "apply_gate", "check_gates", "flatten_gates", "ones_gates",
              "unflatten_gates"),
    "gated": ("Capture", "GatedModel"),
    "meta": ("ModelMeta", "default_meta"),
    "registry": ("CIFAR10_CLASSES", "ModelCard", "create_model", "gate_spec", "init_model", "list_models",
                 "model_card"),
    "base": ("GATE_PLACEMENTS",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'jaxroute.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxroute.models.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
