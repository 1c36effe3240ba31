"""Carlini–Wagner L2 (Carlini & Wagner, S&P 2017), batched, per-sample binary search over c.

Change of variables (as the reference ``l2_attack.py``)::

    x'(w) = (tanh(w) + 1) / 2,   w_0 = atanh((2x - 1) · 0.999999)

so x' always lies in [0, 1].  For each sample, minimise over w

    ||x'(w) - x||₂² + c · max(Z_y(x') - max_{i≠y} Z_i(x'), -κ)        (untargeted, y = label)
    ||x'(w) - x||₂² + c · max(max_{i≠t} Z_i(x') - Z_t(x'), -κ)        (targeted, t = target)

with Adam (lr 0.01 by default) for ``steps`` iterations, restarting from
w_0 with a fresh Adam state for every value of c.  A point counts as
adversarial when ``argmax(Z ∓ κ·1_y)`` is ≠ y (untargeted) / = t
(targeted), the reference code's test.  Over ALL iterations of all
binary-search rounds each sample keeps its adversarial point with the
smallest L2; samples that never succeed get back their clean image
(``success=False``, zero perturbation).

Binary search (reference code, per sample): c starts at ``initial_c``;
after a round, if the sample succeeded, upper = min(upper, c), otherwise
lower = max(lower, c); then c = (lower + upper) / 2 if an upper bound is
known, else c · 10.

Early abort (``abort_early=True``, per sample; the reference code does it
per batch): every max(steps // 10, 1) iterations a sample whose loss is
not below 0.9999 × its loss at the previous check is frozen for the rest
of the round; the round ends when all samples are frozen.

Everything (all rounds, all iterations) runs in one compiled program: a
``lax.scan`` over rounds around a ``lax.while_loop`` over iterations.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxroute.attacks.core import (
    AttackResult, LogitsFn, bcast, check_int, check_positive, finish, make_config, per_sample,
    predict, prepare,
)

_BIG = 1e10


@dataclasses.dataclass(frozen=True)
class CWConfig:
    initial_c: float = 1e-2
    kappa: float = 0.0
    steps: int = 100
    binary_search_steps: int = 5
    lr: float = 0.01
    abort_early: bool = True

    def __post_init__(self):
        check_positive(self.initial_c, "initial_c")
        check_positive(self.lr, "lr")
        check_int(self.steps, "steps")
        check_int(self.binary_search_steps, "binary_search_steps")
        if not self.kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {self.kappa}")


def cw_l2(logits_fn: LogitsFn, x: jax.Array, config: CWConfig | None = None, *,
          label: jax.Array | None = None, target: jax.Array | None = None, **kwargs) -> AttackResult:
    """Carlini–Wagner L2, batched (see the module docstring for the exact algorithm).

    ``label=None`` uses the clean prediction; ``target`` makes it targeted.
    ``AttackResult.iterations`` is the number of Adam steps each sample ran
    (summed over rounds).
    """
    cfg = make_config(CWConfig, config, kwargs)
    logits_fn, x, label, target, num_classes = prepare(logits_fn, x, label, target)
    if label is None:
        label = predict(logits_fn, x)
    targeted = target is not None
    y = target if targeted else label
    onehot = jax.nn.one_hot(y, num_classes, dtype=bool)
    b = x.shape[0]
    kappa = cfg.kappa
    opt = optax.adam(cfg.lr)
    w0 = jnp.arctanh((2.0 * x - 1.0) * 0.999999)
    every = max(cfg.steps // 10, 1)

    def to_img(w):
        return (jnp.tanh(w) + 1.0) / 2.0

    def is_adv(z):
        zz = jnp.where(onehot, z - kappa if targeted else z + kappa, z)
        p = jnp.argmax(zz, axis=-1)
        return (p == y) if targeted else (p != y)

    def loss_fn(w, c):
        xa = to_img(w)
        z = logits_fn(xa)
        l2sq = per_sample(jnp.sum, jnp.square(xa - x))
        real = jnp.sum(jnp.where(onehot, z, 0.0), axis=-1)
        other = jnp.max(jnp.where(onehot, -jnp.inf, z), axis=-1)
        margin = (other - real) if targeted else (real - other)
        loss = l2sq + c * jnp.maximum(margin, -kappa)
        return jnp.sum(loss), (loss, l2sq, z, xa)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def one_round(carry, _):
        c, lower, upper, best_l2, best_adv, iters = carry

        def cond(s):
            i, _, _, _, frozen, *_ = s
            return (i < cfg.steps) & ~jnp.all(frozen)

        def body(s):
            i, w, st, prev, frozen, best_l2, best_adv, found, iters = s
            g, (loss, l2sq, z, xa) = grad_fn(w, c)
            live = ~frozen
            succ = is_adv(z) & live
            better = succ & (l2sq < best_l2)
            best_l2 = jnp.where(better, l2sq, best_l2)
            best_adv = jnp.where(bcast(better, xa), xa, best_adv)
            found = found | succ
            upd, st = opt.update(g, st, w)
            w = jnp.where(bcast(live, w), optax.apply_updates(w, upd), w)
            iters = iters + live.astype(jnp.int32)
            if cfg.abort_early:
                check = (i % every) == 0
                frozen = frozen | (check & live & (loss > prev * 0.9999))
                prev = jnp.where(check, loss, prev)
            return i + 1, w, st, prev, frozen, best_l2, best_adv, found, iters

        init = (jnp.int32(0), w0, opt.init(w0), jnp.full((b,), jnp.inf, x.dtype),
                jnp.zeros((b,), bool), best_l2, best_adv, jnp.zeros((b,), bool), iters)
        _, _, _, _, _, best_l2, best_adv, found, iters = jax.lax.while_loop(cond, body, init)
        upper = jnp.where(found, jnp.minimum(upper, c), upper)
        lower = jnp.where(found, lower, jnp.maximum(lower, c))
        c = jnp.where(upper < _BIG / 10, (lower + upper) / 2.0, c * 10.0)
        return (c, lower, upper, best_l2, best_adv, iters), None

    carry = (jnp.full((b,), cfg.initial_c, x.dtype), jnp.zeros((b,), x.dtype),
             jnp.full((b,), _BIG, x.dtype), jnp.full((b,), jnp.inf, x.dtype), x,
             jnp.zeros((b,), jnp.int32))
    (_, _, _, best_l2, best_adv, iters), _ = jax.lax.scan(one_round, carry, None,
                                                           length=cfg.binary_search_steps)
    found = jnp.isfinite(best_l2)
    adv = jnp.where(bcast(found, x), best_adv, x)
    return finish(logits_fn, x, adv, label, target, iterations=iters)


carlini_wagner_l2 = cw_l2
