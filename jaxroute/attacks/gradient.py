"""Sign-gradient attacks: FGSM, iterative FGSM / BIM, PGD (L∞ and L2).

Notation: x the clean batch, x_t the iterate, Π_[0,1] clipping to [0, 1],
CE the per-sample softmax cross-entropy, g_t = ∇_x CE(y, f(x_t)) computed
per sample (the gradient of the batch *sum*; torchattacks differentiates
the batch *mean*, which scales every gradient by 1/B and leaves signs and
L2-normalised directions unchanged).

Untargeted (``target=None``), y = ``label`` or, if ``label`` is None, the
model's clean prediction (the label-leaking-free variant): ascend CE(y).
Targeted, y = ``target``: descend CE(target).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jaxroute.attacks.core import (
    AttackResult, LogitsFn, bcast, ce_grad, check_positive, cross_entropy, finish, l2_norm, predict, prepare,
    resolve_config,
)
from jaxroute.utils.checks import check_int


def _labels(logits_fn, x, label, target):
    """(y the CE label, direction +1 ascend / -1 descend, recorded label)."""
    if label is None:
        label = predict(logits_fn, x)
    if target is not None:
        return target, -1.0, label
    return label, 1.0, label


# --------------------------------------------------------------------------
# FGSM
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FGSMConfig:
    """x_adv = Π_[0,1](x ± eps · sign(∇_x CE(y, f(x)))) (Goodfellow et al. 2015)."""

    eps: float = 8 / 255

    def __post_init__(self):
        check_positive(self.eps, "eps")


def fgsm(logits_fn: LogitsFn, x: jax.Array, *, label: jax.Array | None = None, target: jax.Array | None = None,
         key: jax.Array | None = None, config: FGSMConfig | None = None) -> AttackResult:
    """Fast gradient sign method, one step of size ``eps``.

    * ``label`` given: untargeted with the true label (``+eps·sign``);
    * ``label=None``: untargeted with the model's clean prediction (no label leaking);
    * ``target`` given: targeted, ``x - eps·sign(∇ CE(target))``.

    Cost: one forward + one backward (+ one forward to evaluate the result).
    Identical to ``torchattacks.FGSM(model, eps)`` (targeted: ``set_mode_targeted_by_label``).
    """
    cfg = resolve_config(FGSMConfig, config)
    logits_fn, x, label, target, _ = prepare(logits_fn, x, label, target)
    if target is None and label is None:
        # one forward serves both the prediction and the gradient
        logits, vjp = jax.vjp(logits_fn, x)
        label = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        g_logits = jax.grad(lambda z: jnp.sum(cross_entropy(z, label)))(logits)
        (g,) = vjp(g_logits.astype(logits.dtype))
        y, sign = label, 1.0
    else:
        y, sign, label = _labels(logits_fn, x, label, target)
        g, _ = ce_grad(logits_fn, x, y)
    adv = jnp.clip(x + sign * cfg.eps * jnp.sign(g), 0.0, 1.0)
    return finish(logits_fn, x, adv, label, target)


# --------------------------------------------------------------------------
# Iterative FGSM / BIM
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BIMConfig:
    """Iterative FGSM.

    ``alpha=None`` (default, DGR paper Eqs. 5-6, Wang et al. CVPR 2018)::

        targeted:   x_{t+1} = Π_[0,1](x_t - eps · sign(∇ CE(y*,     f(x_t))))
        untargeted: x_{t+1} = Π_[0,1](x_t + eps · sign(∇ CE(y_true, f(x_t))))

    for t = 0..steps-1: step size ``eps``, no eps-ball projection (the total
    L∞ change can reach ``steps * eps``).  Paper defaults eps=0.01, T=10.

    ``alpha`` given (torchattacks ``BIM(eps, alpha, steps)`` semantics): step
    size ``alpha`` and, after each step, projection onto the L∞ ball of
    radius ``eps`` around x, then onto [0, 1]::

        x_{t+1} = Π_[0,1](Π_{||·-x||∞<=eps}(x_t ± alpha · sign(g_t)))

    ``normalization=(mean, std)`` (with ``alpha=None``): the official DGR
    code's scale.  It steps ``eps`` on the *normalised* input x̃ = (x − μ)/σ
    and clamps x̃ to the image's own normalised [min, max] (one min and one
    max over all pixels and channels).  In pixel units that is a step of
    ``eps · σ_c`` per channel (0.01 · 0.226 ≈ 0.00226 for the ImageNet σ)
    and a per-channel clamp to [μ_c + σ_c·min x̃, μ_c + σ_c·max x̃].  That
    range can reach slightly outside [0, 1] (the official code has no other
    clip); here it is intersected with [0, 1] so that the adversarials stay
    valid images (a deviation of at most one step's worth for the few pixels
    concerned).
    """

    eps: float = 0.01
    steps: int = 10
    alpha: float | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self):
        check_positive(self.eps, "eps")
        check_int(self.steps, "steps")
        if self.alpha is not None:
            check_positive(self.alpha, "alpha")
        if self.normalization is not None:
            try:
                mean, std = (tuple(float(v) for v in part) for part in self.normalization)
            except (TypeError, ValueError):
                raise ValueError(f"normalization must be (mean, std), two tuples of per-channel floats, "
                                 f"got {self.normalization!r}") from None
            if len(mean) != len(std) or not mean:
                raise ValueError(f"normalization: mean and std need one value per channel each, got "
                                 f"{len(mean)} and {len(std)}")
            check_positive(std, "normalization std")
            if self.alpha is not None:
                raise ValueError("normalization (the official DGR scale) has no eps-ball: leave alpha unset")
            object.__setattr__(self, "normalization", (mean, std))


def bim(logits_fn: LogitsFn, x: jax.Array, *, label: jax.Array | None = None, target: jax.Array | None = None,
        key: jax.Array | None = None, config: BIMConfig | None = None) -> AttackResult:
    """Iterative FGSM / BIM (see :class:`BIMConfig` for the exact update).

    ``label=None`` uses the clean prediction as y_true (fixed for all steps).
    Every sample runs all ``steps`` (no early stop), in one ``lax.fori_loop``.
    """
    cfg = resolve_config(BIMConfig, config)
    logits_fn, x, label, target, _ = prepare(logits_fn, x, label, target)
    y, sign, label = _labels(logits_fn, x, label, target)
    project = cfg.alpha is not None
    step = cfg.alpha if project else cfg.eps
    lo, hi = 0.0, 1.0
    if cfg.normalization is not None:
        mean, std = (jnp.asarray(v, x.dtype) for v in cfg.normalization)
        if x.shape[-1] != mean.shape[0]:
            raise ValueError(f"normalization has {mean.shape[0]} channels, the images {x.shape[-1]}")
        xn_ = (x - mean) / std
        axes = tuple(range(1, x.ndim))
        zmin = jnp.min(xn_, axis=axes, keepdims=True)
        zmax = jnp.max(xn_, axis=axes, keepdims=True)
        step = cfg.eps * std
        lo, hi = jnp.maximum(mean + std * zmin, 0.0), jnp.minimum(mean + std * zmax, 1.0)

    def body(_, xt):
        g, _ = ce_grad(logits_fn, xt, y)
        xn = xt + sign * step * jnp.sign(g)
        if project:
            xn = jnp.clip(xn, x - cfg.eps, x + cfg.eps)
        return jnp.clip(xn, lo, hi)

    adv = jax.lax.fori_loop(0, cfg.steps, body, x)
    return finish(logits_fn, x, adv, label, target)


# --------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PGDConfig:
    """Projected gradient descent (Madry et al. 2018), torchattacks ``PGD``/``PGDL2`` semantics.

    ``norm="linf"``: start x_0 = Π_[0,1](x + U(-eps, eps)); step
    x_{t+1} = Π_[0,1](Π_{||·-x||∞<=eps}(x_t ± alpha · sign(g_t))).

    ``norm="l2"``: start x_0 = Π_[0,1](x + δ), δ = r·eps·n/||n||₂ with
    n ~ N(0, I) and r ~ U(0, 1) per sample; step
    x_{t+1} = Π_[0,1](x + Π_{||·||₂<=eps}(x_t ± alpha · g_t/(||g_t||₂ + 1e-10) - x)).

    ``random_start=False`` starts at x (needs no key).
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    norm: Literal["linf", "l2"] = "linf"
    random_start: bool = True

    def __post_init__(self):
        check_positive(self.eps, "eps")
        check_positive(self.alpha, "alpha")
        check_int(self.steps, "steps")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")


def pgd(logits_fn: LogitsFn, x: jax.Array, *, label: jax.Array | None = None, target: jax.Array | None = None,
        key: jax.Array | None = None, config: PGDConfig | None = None) -> AttackResult:
    """PGD in L∞ or L2 (see :class:`PGDConfig`); ``key`` drives the random start."""
    cfg = resolve_config(PGDConfig, config)
    logits_fn, x, label, target, _ = prepare(logits_fn, x, label, target)
    if cfg.random_start and key is None:
        raise ValueError("PGD with random_start=True needs an explicit PRNG key (key=jax.random.key(...))")
    y, sign, label = _labels(logits_fn, x, label, target)
    eps, alpha = cfg.eps, cfg.alpha

    def project_l2(xn):
        d = xn - x
        n = l2_norm(d)
        factor = jnp.minimum(eps / jnp.maximum(n, 1e-30), 1.0)
        return jnp.clip(x + d * bcast(factor, d), 0.0, 1.0)

    x0 = x
    if cfg.random_start:
        if cfg.norm == "linf":
            x0 = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
        else:
            kn, kr = jax.random.split(key)
            n = jax.random.normal(kn, x.shape, x.dtype)
            r = jax.random.uniform(kr, (x.shape[0],), x.dtype)
            d = n * bcast(r * eps / jnp.maximum(l2_norm(n), 1e-30), n)
            x0 = jnp.clip(x + d, 0.0, 1.0)

    def body(_, xt):
        g, _ = ce_grad(logits_fn, xt, y)
        if cfg.norm == "linf":
            xn = xt + sign * alpha * jnp.sign(g)
            return jnp.clip(jnp.clip(xn, x - eps, x + eps), 0.0, 1.0)
        g = g / bcast(l2_norm(g) + 1e-10, g)
        return project_l2(xt + sign * alpha * g)

    adv = jax.lax.fori_loop(0, cfg.steps, body, x0)
    return finish(logits_fn, x, adv, label, target)
