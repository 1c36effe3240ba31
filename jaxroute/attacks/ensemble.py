"""Ensemble-optimization attack (Dong, Su, Zhu & Bao, "Towards Interpretable Deep
Neural Networks by Leveraging Adversarial Examples", arXiv:1708.05493, 2017).

For an ensemble f_1..f_n and a target class y*, solve

    min_{x*}  λ · ||x* - x||₂ + Σ_i CE(1_{y*}, f_i(x*))

with Adam, projecting x* onto [0, 1] after every step (x* starts at x).
Targets are each image's ``k`` least-likely classes under the ensemble's
average softmax probability on the clean image (most unlikely first), so
one call returns k adversarials per image.

Scale conversion.  The paper works on [0, 255] pixels; jaxroute on [0, 1].
Adam's step is invariant to the gradient's scale, so one Adam step moves a
pixel by about ``lr`` in the optimizer's own units: a step size s on
[0, 255] is ``lr = s / 255`` here.  The distance term is the L2 norm of the
perturbation, which shrinks by 255 on [0, 1]; the same objective therefore
needs ``λ_[0,1] = 255 · λ_[0,255]``.

Defaults.  ``steps=20`` is the top of the paper's "10 ~ 20 iterations".
``lr = 5/255`` is the paper's Adam "step size 5" on [0, 255] pixels;
``lam = 0.1·255`` is λ = 0.1 on [0, 255], a value the paper does not give
(unverified; a plain config field).  The objective
(L2 norm, not squared; sum of per-model cross-entropies), Adam, and the
least-likely targets by average ensemble probability follow the paper.
``stop_on_success`` and the [0, 1] projection after every step are this
implementation's choices (stated below).

Early stop (``stop_on_success=True``): a row stops changing at the first
iterate that EVERY model classifies as y* (the smallest-perturbation
success along the path); the loop ends when all rows are done or after
``steps`` iterations.  ``success`` = every model predicts y* on the
returned image; ``adv_pred`` = argmax of the average probability.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from jaxroute.attacks.core import (
    AttackResult, LogitsFn, bcast, check_labels, check_nonnegative, check_positive, cross_entropy, check_images,
    l2_norm, linf_norm, loop_friendly, num_classes_of, per_sample, resolve_config,
)
from jaxroute.utils.checks import check_int


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    k: int = 1
    lam: float = 0.1 * 255
    lr: float = 5 / 255
    steps: int = 20
    stop_on_success: bool = True

    def __post_init__(self):
        check_int(self.k, "k")
        check_int(self.steps, "steps")
        check_positive(self.lr, "lr")
        check_nonnegative(self.lam, "lam")


def mean_probability(logits_fns: Sequence[LogitsFn], x: jax.Array) -> jax.Array:
    """(B, K) the ensemble's average softmax probability (float32)."""
    return sum(jax.nn.softmax(f(x).astype(jnp.float32), axis=-1) for f in logits_fns) / len(logits_fns)


def least_likely(logits_fns: Sequence[LogitsFn], x: jax.Array, k: int = 1) -> jax.Array:
    """(B, k) the k classes with the lowest average ensemble probability, least likely first."""
    return jnp.argsort(mean_probability(logits_fns, x), axis=-1)[:, :k].astype(jnp.int32)


def ensemble_attack(logits_fns: Sequence[LogitsFn] | LogitsFn, x: jax.Array, *,
                    label: jax.Array | None = None, target: jax.Array | None = None,
                    key: jax.Array | None = None, config: EnsembleConfig | None = None) -> AttackResult:
    """Targeted ensemble-optimization attack (see the module docstring).

    ``logits_fns``: one or more ``x -> logits`` functions (a tuple is
    hashable, so ``functools.partial(ensemble_attack, fns, config=cfg)``
    jits).  ``target`` (B,) or (B, k) int overrides the least-likely
    targets.  Returns B·k rows, sample-major: row ``b*k + j`` attacks image
    b towards ``target[b*k + j]``; ``label`` is the given label (only
    recorded: the attack is always targeted), else the clean ensemble
    prediction, repeated.  ``key`` is accepted and ignored (deterministic).  ``x`` itself is ``jnp.repeat(x, k, axis=0)`` of
    the input, so ``result.adv.reshape(B, k, H, W, C)`` groups by image.
    """
    cfg = resolve_config(EnsembleConfig, config)
    fns = (logits_fns,) if callable(logits_fns) else tuple(logits_fns)
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("logits_fns must be a callable or a non-empty sequence of callables x -> logits")
    x = check_images(x)
    ks = {num_classes_of(f, x) for f in fns}
    if len(ks) != 1:
        raise ValueError(f"the ensemble's models disagree on the number of classes: {sorted(ks)}")
    num_classes = ks.pop()
    if cfg.k >= num_classes:
        raise ValueError(f"k={cfg.k} targets per image needs k < {num_classes} classes")
    b, k = x.shape[0], cfg.k
    n = len(fns)
    fns = tuple(loop_friendly(f) for f in fns)

    def avg_prob(xa):
        logits = [f(xa).astype(jnp.float32) for f in fns]
        return sum(jax.nn.softmax(z, axis=-1) for z in logits) / n, logits

    p0, _ = avg_prob(x)
    label = check_labels(label, b, "label", num_classes)
    if label is None:
        label = jnp.argmax(p0, axis=-1).astype(jnp.int32)
    label = jnp.repeat(label, k)
    if target is None:
        t = jnp.argsort(p0, axis=-1)[:, :k].astype(jnp.int32).reshape(-1)
    else:
        if hasattr(target, "ndim") and target.ndim == 2:
            if tuple(target.shape) != (b, k):
                raise ValueError(f"target must have shape ({b},) or ({b}, {k}), got {tuple(target.shape)}")
            target = target.reshape(-1)
            t = check_labels(target, b * k, "target", num_classes)
        elif k == 1:
            t = check_labels(target, b, "target", num_classes)
        else:
            raise ValueError(f"with k={k} targets per image, target must have shape ({b}, {k})")
    xr = jnp.repeat(x, k, axis=0)
    m = b * k
    opt = optax.adam(cfg.lr)

    def all_hit(logits):
        return jnp.all(jnp.stack([jnp.argmax(z, axis=-1) == t for z in logits]), axis=0)

    def loss_fn(xa):
        logits = [f(xa).astype(jnp.float32) for f in fns]
        dist = jnp.sqrt(per_sample(jnp.sum, jnp.square(xa - xr)) + 1e-12)   # grad 0 at xa == x
        loss = cfg.lam * dist + sum(cross_entropy(z, t) for z in logits)
        return jnp.sum(loss), logits

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def cond(s):
        i, _, _, done, _ = s
        return (i < cfg.steps) & ~jnp.all(done)

    def body(s):
        i, xa, st, done, iters = s
        g, logits = grad_fn(xa)
        if cfg.stop_on_success:
            done = done | all_hit(logits)
        upd, st = opt.update(g, st, xa)
        live = ~done
        xa = jnp.where(bcast(live, xa), jnp.clip(optax.apply_updates(xa, upd), 0.0, 1.0), xa)
        return i + 1, xa, st, done, iters + live.astype(jnp.int32)

    init = (jnp.int32(0), xr, opt.init(xr), jnp.zeros((m,), bool), jnp.zeros((m,), jnp.int32))
    _, adv, _, _, iters = jax.lax.while_loop(cond, body, init)
    p, logits = avg_prob(adv)
    d = adv - xr
    return AttackResult(adv=adv, success=all_hit(logits), linf=linf_norm(d), l2=l2_norm(d),
                        adv_pred=jnp.argmax(p, axis=-1).astype(jnp.int32), label=label, target=t,
                        iterations=iters)
