"""The gated model: one object for every method that routes, attacks, explains or probes a network.

A :class:`GatedModel` holds a Flax module, its (inference-mode) variables,
its metadata and its gate layout (computed once).  Every method calls it
the same two ways::

    logits = model.logits(x, gates=None)           # (B, classes)
    cap = model.capture(x, gates=None)             # Capture(logits, acts, features)

``x`` is a batch of pixel-space images (B, H, W, C) in [0, 1]; the model
normalizes internally.  ``gates`` is any of

* ``None``: the ungated network (all gates 1);
* a gate tree ``{gate_point: (C,) or (B, C)}``;
* a flat CDRP array, ``(D,)`` shared by the batch or ``(B, D)`` per sample,
  in the forward order of ``model.spec``;
* a function ``(point_name, activation) -> gate`` returning ``(C,)`` or
  ``(B, C)``, called at every gate point during the forward pass with the
  activation arriving there.  Trained gate controllers (network decoupling)
  and per-class gate vectors (class-specific subnetworks) are such functions.

Both methods are pure functions of their arguments (the variables are
constants of the closure), so they jit, vmap and differentiate; the model
is hashable by identity and so a valid static argument.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxroute.models.gates import GateSpec
from jaxroute.models.meta import ModelMeta


class Capture(NamedTuple):
    """One forward pass with everything the analyses read from it."""

    logits: jax.Array             # (B, classes)
    acts: dict[str, jax.Array]    # {gate_point: activation after its gate}, (B, ..., C)
    features: jax.Array           # (B, F) penultimate features (input of the last linear layer)


@dataclasses.dataclass(frozen=True, eq=False)
class GatedModel:
    """A Flax module with its variables, metadata and gate layout."""

    module: Any
    variables: Mapping
    meta: ModelMeta
    spec: GateSpec = None  # computed from the module when not given

    def __post_init__(self):
        if self.spec is None:
            from jaxroute.models.registry import gate_spec

            object.__setattr__(self, "spec", gate_spec(self.module, self.meta.input_shape))

    # ----------------------------------------------------------------- the two calls
    def logits(self, x: jax.Array, gates=None) -> jax.Array:
        """Logits of the (gated) network on pixel-space images ``x``."""
        return self.module.apply(self.variables, x, gates=self.gate_tree(gates))

    def capture(self, x: jax.Array, gates=None) -> Capture:
        """Logits, the activation at every gate point (after its gate) and the penultimate features."""
        logits, cap = self.module.apply(self.variables, x, gates=self.gate_tree(gates), capture=True)
        return Capture(logits, cap["gates"], cap["features"])

    def gate_tree(self, gates):
        """``gates`` in a form the module takes: a flat CDRP becomes a gate tree; the rest pass as they are."""
        if gates is None or callable(gates) or isinstance(gates, Mapping):
            return gates
        if not hasattr(gates, "shape"):
            raise TypeError("gates must be None, a gate tree {gate_point: array}, a flat CDRP array (D,) or "
                            f"(B, D), or a function (point_name, activation) -> gate; got {type(gates).__name__}")
        if len(gates.shape) not in (1, 2):
            raise ValueError(f"a flat CDRP must have shape ({self.spec.size},) or (B, {self.spec.size}), "
                             f"got {tuple(gates.shape)}")
        return self.spec.split(jnp.asarray(gates))

    # ----------------------------------------------------------------- metadata
    @property
    def name(self) -> str:
        return self.meta.arch

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta.input_shape)

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.meta.class_names

    @property
    def gate_placement(self) -> str:
        return self.module.gate_placement

    @property
    def relu_rule(self) -> str:
        return self.module.relu_rule

    def with_relu_rule(self, rule: str) -> "GatedModel":
        """The same model (variables, gate layout) whose every ReLU back-propagates by ``rule``:
        ``"plain"``, ``"deconvnet"`` or ``"guided"`` (:func:`jaxroute.models.base.relu_with_rule`).
        The forward pass is unchanged."""
        from jaxroute.models.base import RELU_RULES

        if rule not in RELU_RULES:
            raise ValueError(f"relu rule must be one of {RELU_RULES}, got {rule!r}")
        if rule == self.module.relu_rule:
            return self
        return dataclasses.replace(self, module=self.module.clone(relu_rule=rule))

    def with_variables(self, variables: Mapping) -> "GatedModel":
        """The same model with other variables (e.g. after training); the gate layout is kept."""
        return dataclasses.replace(self, variables=variables)


def check_dataset_fits(model: GatedModel, dataset) -> None:
    """Raise a ValueError when a data set's images or classes do not fit the model."""
    shape = tuple(dataset.images.shape[1:])
    if shape != model.input_shape:
        raise ValueError(f"data {dataset.name!r} has images of shape {shape}, model {model.name} "
                         f"expects {model.input_shape}")
    if model.num_classes < len(dataset.class_names):
        raise ValueError(f"data has {len(dataset.class_names)} classes, model outputs {model.num_classes}")
