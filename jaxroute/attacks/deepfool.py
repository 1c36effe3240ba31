"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2, batched with per-sample early stopping.

For each sample, with label y (the clean prediction, or a given label) and
candidate classes k ≠ y, every iteration linearises the classifier at the
current iterate x_i:

    w_k = ∇f_k(x_i) - ∇f_y(x_i),   f'_k = f_k(x_i) - f_y(x_i)
    l̂   = argmin_k |f'_k| / ||w_k||₂
    r_i = (|f'_l̂| + 1e-4) · w_l̂ / ||w_l̂||₂²          (the reference code's 1e-4)

and updates

* ``update="original"`` (reference implementation): r_tot += r_i,
  x_{i+1} = Π_[0,1](x + (1 + overshoot) · r_tot);
* ``update="torchattacks"`` (``torchattacks.DeepFool``): no 1e-4 term and
  x_{i+1} = Π_[0,1](x_i + (1 + overshoot) · r_i).

A sample is done as soon as its prediction at the current iterate differs
from y; done samples are frozen (they never change again).  The whole
batch runs in ONE compiled ``lax.while_loop`` that ends when every sample
is done or after ``max_iter`` iterations; each iteration is one batched
forward pass plus K batched backward passes for the K candidate-class
gradients (``vmap`` of the ``vjp`` over one-hot cotangents), computed for
every sample of the batch (shapes are static), used only by the live ones.

Candidates: all classes (``num_candidates=None``) or y plus the
``num_candidates - 1`` other classes with the largest clean logits (the
reference code's ``num_classes`` argument; there y is the clean top-1, so
the candidates are simply the top-k classes).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jaxroute.attacks.core import (
    AttackResult, LogitsFn, bcast, check_int, finish, make_config, prepare,
)


@dataclasses.dataclass(frozen=True)
class DeepFoolConfig:
    overshoot: float = 0.02
    max_iter: int = 50
    num_candidates: int | None = None
    update: Literal["original", "torchattacks"] = "original"

    def __post_init__(self):
        if not self.overshoot >= 0:
            raise ValueError(f"overshoot must be >= 0, got {self.overshoot}")
        check_int(self.max_iter, "max_iter")
        if self.num_candidates is not None:
            check_int(self.num_candidates, "num_candidates", minimum=2)
        if self.update not in ("original", "torchattacks"):
            raise ValueError(f"update must be 'original' or 'torchattacks', got {self.update!r}")


def deepfool(logits_fn: LogitsFn, x: jax.Array, config: DeepFoolConfig | None = None, *,
             label: jax.Array | None = None, **kwargs) -> AttackResult:
    """Untargeted L2 DeepFool (see the module docstring for the exact update).

    ``label=None``: y is the clean prediction (the paper's setting); with a
    given label, samples the model already misclassifies are done at
    iteration 0 with a zero perturbation (as in torchattacks).
    ``AttackResult.iterations`` holds each sample's number of updates.
    """
    cfg = make_config(DeepFoolConfig, config, kwargs)
    logits_fn, x, label, _, num_classes = prepare(logits_fn, x, label, None)
    kc = num_classes if cfg.num_candidates is None else cfg.num_candidates
    if kc > num_classes:
        raise ValueError(f"num_candidates={kc} exceeds the model's {num_classes} classes")
    b = x.shape[0]

    logits0 = logits_fn(x)
    if label is None:
        label = jnp.argmax(logits0, axis=-1).astype(jnp.int32)
    # Candidate classes, y first, then the other classes by decreasing clean logit.
    order = jnp.where(jax.nn.one_hot(label, num_classes, dtype=bool), jnp.inf, logits0)
    cand = jnp.argsort(-order, axis=-1)[:, :kc].astype(jnp.int32)       # (B, K), cand[:, 0] == label
    eye = jnp.broadcast_to(jnp.eye(kc, dtype=logits0.dtype)[:, None, :], (kc, b, kc))

    def fwd(xi):
        full = logits_fn(xi)
        return jnp.take_along_axis(full, cand, axis=1), full

    def cond(state):
        i, _, _, done, _ = state
        return (i < cfg.max_iter) & ~jnp.all(done)

    def body(state):
        i, xi, r_tot, done, iters = state
        zc, vjp, full = jax.vjp(fwd, xi, has_aux=True)
        done = done | (jnp.argmax(full, axis=-1) != label)
        jac = jax.vmap(lambda ct: vjp(ct)[0])(eye)                        # (K, B, H, W, C)
        jac = jnp.moveaxis(jac, 0, 1)                                     # (B, K, H, W, C)
        w = jac[:, 1:] - jac[:, :1]                                       # (B, K-1, H, W, C)
        f = zc[:, 1:] - zc[:, :1]                                         # (B, K-1)
        wn2 = jnp.sum(jnp.square(w.reshape(b, kc - 1, -1)), axis=-1)      # (B, K-1)
        wn = jnp.sqrt(wn2)
        value = jnp.abs(f) / jnp.maximum(wn, 1e-12)
        l = jnp.argmin(value, axis=1)
        f_l = jnp.take_along_axis(f, l[:, None], axis=1)[:, 0]
        wn2_l = jnp.take_along_axis(wn2, l[:, None], axis=1)[:, 0]
        w_l = jnp.take_along_axis(w, l[:, None, None, None, None], axis=1)[:, 0]
        if cfg.update == "original":
            r_i = w_l * bcast((jnp.abs(f_l) + 1e-4) / jnp.maximum(wn2_l, 1e-24), w_l)
            r_new = r_tot + r_i
            x_new = jnp.clip(x + (1.0 + cfg.overshoot) * r_new, 0.0, 1.0)
        else:
            r_i = w_l * bcast(jnp.abs(f_l) / jnp.maximum(wn2_l, 1e-24), w_l)
            r_new = r_tot + r_i
            x_new = jnp.clip(xi + (1.0 + cfg.overshoot) * r_i, 0.0, 1.0)
        live = bcast(~done, xi)
        xi = jnp.where(live, x_new, xi)
        r_tot = jnp.where(live, r_new, r_tot)
        iters = iters + (~done).astype(jnp.int32)
        return i + 1, xi, r_tot, done, iters

    init = (jnp.int32(0), x, jnp.zeros_like(x), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    _, adv, _, _, iters = jax.lax.while_loop(cond, body, init)
    return finish(logits_fn, x, adv, label, None, iterations=iters)
