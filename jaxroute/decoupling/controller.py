"""Architecture controllers and Improved SemHash (Li et al., "Interpretable neural network
decoupling", network decoupling).

A controller sits on every conv but the first.  It reads the global average
of the conv's *input*, s = GAP(X), and predicts one logit per output filter::

    Ḡ = W2 · ReLU(W1 · s + b1) + b2,    W1: C/γ × C,  W2: N × C/γ,  γ = 4

Initialisation follows the official code: W1 = 0, b1 = 1, W2 Kaiming-normal
(fan-in, gain √2, untruncated), b2 = 1, so at the start Ḡ is the same for
every input and every sample selects the same filters.  Each controller also
owns the mutual-information classifier W_cla (N → classes, no bias,
Kaiming-normal) that the MI loss reads (``mi_logits``).

Improved SemHash turns Ḡ into the binary gate z (:func:`semhash`).

Deviation: the code calls ``torch.nn.init.kaiming_normal`` (untruncated); Flax's
``kaiming_normal`` is truncated, so the untruncated variance-scaling normal is used.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxroute.utils.checks import check_int

SEMHASH_MODES = ("half", "official")
_KAIMING = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def check_reduction(channels: int, reduction: int, where: str = "controller") -> None:
    check_int(reduction, "controller reduction γ")
    if channels % reduction:
        raise ValueError(f"{where}: input channels C = {channels} are not divisible by the reduction "
                         f"γ = {reduction} (C/γ hidden units); choose a γ that divides every C")


def semhash_parts(key: jax.Array, g: jax.Array):
    """Noisy logits s̃ = Ḡ + α (α ~ N(0, 1)), v1 = clip(1.2 σ(s̃) − 0.1, 0, 1), v2 = 1(s̃ > 0)."""
    s = g + jax.random.normal(key, g.shape, g.dtype)
    v1 = jnp.clip(1.2 * jax.nn.sigmoid(s) - 0.1, 0.0, 1.0)
    v2 = (s > 0).astype(g.dtype)
    return v1, v2


def binarised_rows(key: jax.Array, batch: int, channels: int, mode: str = "half") -> jax.Array:
    """(B,) bool: the samples whose gates take the binary v2 in one SemHash draw.

    ``"half"`` (the paper): exactly ⌊B/2⌋ distinct samples, uniformly at random.
    ``"official"`` (utils/utils.py): ``index = randint(0, N, [N/2])`` with N the
    *channel* count, with replacement, so only rows < min(B, N) can be chosen;
    indices ≥ B (possible when N > B) would raise in PyTorch and are dropped here.
    """
    if mode == "half":
        order = jax.random.permutation(key, batch)
        return jnp.zeros((batch,), bool).at[order[: batch // 2]].set(True)
    if mode == "official":
        index = jax.random.randint(key, (channels // 2,), 0, channels)
        return jnp.zeros((batch,), bool).at[index].set(True, mode="drop")
    raise ValueError(f"semhash mode must be one of {SEMHASH_MODES}, got {mode!r}")


def semhash(key: jax.Array | None, g: jax.Array, train: bool, mode: str = "half") -> jax.Array:
    """Improved SemHash on controller logits ``g`` (B, N) -> gates z (B, N).

    Training: z = v2 on the rows :func:`binarised_rows` picks, v1 on the others,
    with the gradient of v1 everywhere (straight through: v1 + stop_gradient(v2 − v1)
    on the binarised rows), as the code's custom backward passes the output
    gradient to v1.  Evaluation (``train=False``): z = 1(Ḡ > 0), no noise, ``key`` unused.
    """
    if mode not in SEMHASH_MODES:
        raise ValueError(f"semhash mode must be one of {SEMHASH_MODES}, got {mode!r}")
    if not train:
        return (g > 0).astype(g.dtype)
    if key is None:
        raise ValueError("semhash in training mode needs a PRNG key")
    k_noise, k_rows = jax.random.split(key)
    v1, v2 = semhash_parts(k_noise, g)
    rows = binarised_rows(k_rows, g.shape[0], g.shape[1], mode)[:, None]
    return v1 + jax.lax.stop_gradient(jnp.where(rows, v2 - v1, 0.0))


class Controller(nn.Module):
    """One layer's controller: GAP of the conv input -> FC -> ReLU -> FC -> SemHash.

    Returns ``(z, mi_logits)``.  SemHash is stochastic exactly when the module is
    applied with a ``"semhash"`` PRNG stream (``rngs={"semhash": key}``), independently
    of the batch-norm ``train`` flag, so a frozen backbone can keep its running
    statistics while the controllers train.
    """

    features: int          # N, the controlled conv's filters
    num_classes: int = 10
    reduction: int = 4     # γ
    mode: str = "half"

    @nn.compact
    def __call__(self, x: jax.Array):
        c = x.shape[-1]
        check_reduction(c, self.reduction, self.name or "controller")
        s = x.mean(axis=tuple(range(1, x.ndim - 1)))
        h = nn.relu(nn.Dense(c // self.reduction, kernel_init=nn.initializers.zeros,
                             bias_init=nn.initializers.ones, name="fc1")(s))
        g = nn.Dense(self.features, kernel_init=_KAIMING, bias_init=nn.initializers.ones, name="fc2")(h)
        stochastic = self.has_rng("semhash")
        z = semhash(self.make_rng("semhash") if stochastic else None, g, stochastic, self.mode)
        mi_logits = nn.Dense(self.num_classes, use_bias=False, kernel_init=_KAIMING, name="fc_class")(z)
        return z, g, mi_logits


def controlled(gp, ctrl: Controller | None, name: str, x_in: jax.Array, out: jax.Array) -> jax.Array:
    """Gate point ``name`` on ``out`` with the controller's z computed from ``x_in``.

    Records what the losses need (z, Ḡ, the MI logits and ȳ = GAP of ``out``
    before the gate) in ``gp.extra``.  Without a controller (other placements)
    this is the identity.
    """
    if ctrl is None:
        return out
    z, g, mi_logits = ctrl(x_in)
    gp.extra[name] = {"z": z, "logits": g, "mi_logits": mi_logits,
                      "ybar": out.mean(axis=tuple(range(1, out.ndim - 1)))}
    return gp.site("decouple", name, out, default=z)
