"""The decoupling losses (Eq. 12): L = CE + λm·Lmi + λk·Lkl + λs·Ls, each a sum over the
controlled layers l.  Every function takes dicts ``{gate_point: (B, N)}`` (the
``cap["decouple"]`` entries of a decoupled forward pass) and returns a scalar.

* ``mi``: Σ_l CE(W_cla^l · z^l, y), batch mean (the code's ``nn.CrossEntropyLoss``).
* ``kl``: Σ_l KL between softmax(z^l) and softmax(ȳ^l), ȳ = GAP of the layer's output
  before its gate (post-ReLU for conv1 of a block, bn2's pre-ReLU output for conv2).
  ``direction="z_y"`` is the paper's KL(z ‖ ȳ) (and the code's ResNet-20/VGG branches);
  ``"y_z"`` is KL(ȳ ‖ z), the code's ResNet-56/ResNet-18 branches.  ``reduction="mean"``
  is the code's ``F.kl_div`` default, the elementwise mean (sum / (B·N));
  ``"batchmean"`` divides by B (the true per-sample KL), ``"sum"`` does not divide.
* ``sparse``: Σ_l |mean_b ‖z_b^l‖₁ − R·N^l| (the code); ``per_sample=True`` gives the
  paper's per-sample form Σ_l mean_b |‖z_b^l‖₁ − R·N^l|.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

KL_DIRECTIONS = ("z_y", "y_z")
KL_REDUCTIONS = ("mean", "batchmean", "sum")


def _points(tree: Mapping, what: str) -> list:
    if not isinstance(tree, Mapping) or not tree:
        raise ValueError(f"{what} must be a non-empty dict {{gate_point: (B, N) array}}")
    return list(tree)


def mi(mi_logits: Mapping, labels: jax.Array) -> jax.Array:
    """Σ_l mean_b CE(W_cla^l z_b^l, y_b)."""
    return sum(optax.softmax_cross_entropy_with_integer_labels(mi_logits[p], labels).mean()
               for p in _points(mi_logits, "mi_logits"))


def kl(z: Mapping, ybar: Mapping, direction: str = "z_y", reduction: str = "mean") -> jax.Array:
    """Σ_l KL between softmax(z^l) and softmax(ȳ^l); see the module doc for the options."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"kl direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    total = 0.0
    for p in _points(z, "z"):
        a, b = (z[p], ybar[p]) if direction == "z_y" else (ybar[p], z[p])
        la, lb = jax.nn.log_softmax(a, -1), jax.nn.log_softmax(b, -1)
        s = jnp.sum(jnp.exp(la) * (la - lb))
        total = total + s / {"mean": a.size, "batchmean": a.shape[0], "sum": 1}[reduction]
    return total


def sparse(z: Mapping, ratio: float = 0.0, per_sample: bool = False) -> jax.Array:
    """Σ_l |mean_b ‖z_b‖₁ − R·N| (``per_sample``: Σ_l mean_b |‖z_b‖₁ − R·N|)."""
    total = 0.0
    for p in _points(z, "z"):
        norms = jnp.abs(z[p]).sum(-1)
        target = ratio * z[p].shape[-1]
        total = total + (jnp.abs(norms - target).mean() if per_sample else jnp.abs(norms.mean() - target))
    return total
