"""Gate-aware functional models: pick by name, gate by pytree."""
from jaxroute.models.gates import (
    GateSpec, GateTree, apply_gate, check_gates, flatten_gates, ones_gates, unflatten_gates,
)
from jaxroute.models.registry import (
    CIFAR10_CLASSES, ModelCard, create_model, gate_spec, init_model, list_models, model_card,
)
from jaxroute.models.base import GATE_PLACEMENTS

__all__ = [
    "GATE_PLACEMENTS", "CIFAR10_CLASSES", "GateSpec", "GateTree", "ModelCard", "apply_gate",
    "check_gates", "create_model", "flatten_gates", "gate_spec", "init_model", "list_models",
    "model_card", "ones_gates", "unflatten_gates",
]
