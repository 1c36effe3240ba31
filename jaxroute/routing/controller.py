"""The calculation paths of a decoupled model (:mod:`jaxroute.decoupling`) as a router,
``route --method controller``.

Network decoupling (Li et al., CVPR 2020) needs no per-input optimisation: an
input's path is what its controllers select in eval mode, z = 1(Ḡ > 0) at every
gate point, concatenated in forward order (:func:`~jaxroute.models.gates.flatten_gates`,
672 entries on ResNet-20).  :func:`controller_route` returns it as a
:class:`~jaxroute.routing.Route`, so the generic route job writes controller paths
into the same shards and manifest as DGR's CDRPs and every reader of route
outputs (``jaxroute detect``, :mod:`jaxroute.analysis`, the CDRP tools) takes them
unchanged.

The fields, with the meaning every router gives them:

* ``cdrp``: z, 0/1 floats (B, D);
* ``full_logits`` / ``pred``: the network with every gate on (z ≡ 1, the decoupled
  model's backbone with all filters), the "full model" of every router;
* ``gated_logits`` / ``gated_pred``: the decoupled network as it runs, its controllers
  choosing the path (bit-for-bit ``model.logits(x)``), so the route summary's
  ``top1_accuracy`` is the decoupled model's and ``top1_agreement`` how often its
  path keeps the full network's top-1;
* ``loss``: DGR's objective evaluated at the path, distillation cross-entropy
  −Σ p log q (p from the full, q from the gated logits) + γ‖z‖₁ with γ =
  ``ControllerConfig.gamma`` (DGR's default), so controller paths and CDRPs can be
  compared on one scale; nothing is optimised;
* ``fell_back``: always False (every input gets its path); ``iterations``: 0 (one
  forward pass, no iterate).

A model without controllers (a plain checkpoint) is refused before any work with
one line naming the controllers it lacks (:meth:`ControllerConfig.check_model`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxroute.models.base import DECOUPLE_PLACEMENT
from jaxroute.routing.route import Route


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """The controller router has no hyper-parameter of its own (eval-mode z = 1(Ḡ > 0),
    as in the paper); ``gamma`` only weighs ‖z‖₁ in the reported ``loss`` (module doc)."""

    gamma: float = 0.05

    def __post_init__(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (
                math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"controller gamma must be a finite number >= 0, got {self.gamma!r}")

    def check_model(self, model) -> None:
        """Raise a one-line ValueError unless ``model`` is a decoupled model (it has controllers)."""
        check_controllers(model)


def missing_controllers(model) -> list[str]:
    """The controllers (parameter paths) a decoupled model of ``model``'s architecture has and
    ``model`` lacks: all of them for a plain model, none for a decoupled one."""
    from flax.traverse_util import flatten_dict

    from jaxroute.decoupling.model import decouple_module, is_controller_path
    from jaxroute.weights.loader import abstract_variables

    shapes = abstract_variables(decouple_module(model.name, num_classes=model.num_classes), model.input_shape)
    have = set(flatten_dict(dict(model.variables["params"])))
    names = []
    for path in flatten_dict(dict(shapes["params"])):
        if path in have or not is_controller_path(path):
            continue
        i = next(k for k, p in enumerate(path) if p.startswith("controller"))
        name = "/".join(path[:i + 1])
        if name not in names:
            names.append(name)
    return names


def check_controllers(model) -> None:
    """A one-line ValueError unless ``model`` is a decoupled model with all its controllers."""
    what = "routing method 'controller' needs a decoupled model (written by `jaxroute decouple`)"
    if model.gate_placement == DECOUPLE_PLACEMENT:  # its module creates (and restores) every controller
        return
    from jaxroute.decoupling.model import DECOUPLE_MODELS

    if model.name not in DECOUPLE_MODELS:
        raise ValueError(f"{what}; network decoupling supports {', '.join(DECOUPLE_MODELS)}, got a plain "
                         f"{model.name!r}")
    raise ValueError(f"{what}: this {model.name} (gate placement {model.gate_placement!r}) has no architecture "
                     f"controllers; missing {_names(missing_controllers(model))}")


def _names(names: list[str], head: int = 6) -> str:
    if len(names) <= head + 2:
        return ", ".join(names)
    return f"{', '.join(names[:head])}, ..., {names[-1]} ({len(names)} in all)"


def controller_route(model, x: jax.Array, *, config: ControllerConfig = ControllerConfig()) -> Route:
    """The eval-mode calculation paths of a decoupled model as a :class:`Route` (module doc).

    Pure and jittable (``config`` static); ``model`` a decoupled
    :class:`~jaxroute.models.GatedModel`, ``x`` pixel-space images (B, H, W, C).
    """
    from jaxroute.decoupling.model import path_features

    check_controllers(model)  # at trace time: free inside jit
    spec = model.spec
    ones = jnp.ones((x.shape[0], spec.size), x.dtype)
    full_logits = model.logits(x, ones)
    paths, _, gated_logits = path_features(model, x)
    cdrp = paths.astype(x.dtype)
    p = jax.nn.softmax(full_logits)
    loss = -jnp.sum(p * jax.nn.log_softmax(gated_logits), axis=-1) + config.gamma * jnp.sum(jnp.abs(cdrp), -1)
    b = x.shape[0]
    return Route(cdrp=cdrp, loss=loss, fell_back=jnp.zeros((b,), bool), iterations=jnp.zeros((b,), jnp.int32),
                 pred=jnp.argmax(full_logits, -1), gated_pred=jnp.argmax(gated_logits, -1),
                 gated_logits=gated_logits, full_logits=full_logits)
