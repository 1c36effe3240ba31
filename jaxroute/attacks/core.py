"""Shared pieces of the attacks: the result type, input checks, losses, norms.

Conventions used by every attack in :mod:`jaxroute.attacks`:

* One shape: ``attack(f, x, *, label=None, target=None, key=None, config=None)
  -> AttackResult``.  Deterministic attacks accept ``key`` and ignore it, so
  every attack can be called the same way; an untargeted-only attack
  (DeepFool) refuses a ``target``.
* ``f(x) -> logits`` is any pure function of a pixel-space image
  batch ``x`` (B, H, W, C) float in [0, 1] (normalization lives inside the
  model).  It must treat samples independently (inference-mode BN), so the
  gradient of a *summed* per-sample loss is the stack of per-sample
  gradients; every attack relies on that to run one batched
  forward/backward per step.  For a :class:`~jaxroute.models.GatedModel`
  ``m``: ``f = m.logits`` (ungated), or ``functools.partial(m.logits, gates=g)``.
* All epsilons, step sizes and norms are in [0, 1] pixel units; every
  adversarial image is clipped to [0, 1].
* ``label`` (B,) int: the class to move away from (untargeted).  ``None``
  means the model's own prediction on the clean image (no label leaking).
  ``target`` (B,) int: the class to move towards (targeted); when given the
  attack is targeted and ``label`` is only recorded.
* Each attack is a pure function; configs are frozen dataclasses (hashable,
  so static under ``jax.jit``); random parts take an explicit PRNG ``key``.
  Jit with ``jax.jit(functools.partial(attack, f, config=cfg))``.
* Input checks run eagerly when arrays are concrete and are skipped under
  tracing (inside ``jit``/``vmap`` only shapes and dtypes are checked).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.utils.conv_grads import loop_friendly

LogitsFn = Callable[[jax.Array], jax.Array]


class AttackResult(NamedTuple):
    """Output of every attack; all fields have the attacked rows as leading axis (N).

    N = B for all attacks but :func:`~jaxroute.attacks.ensemble_attack`
    (N = B * k there, sample-major: row ``b * k + j`` is image b's j-th target).
    """

    adv: jax.Array        # (N, H, W, C) adversarial images in [0, 1]
    success: jax.Array    # (N,) bool: targeted -> adv_pred == target; untargeted -> adv_pred != label
    linf: jax.Array       # (N,) max |adv - x| per sample
    l2: jax.Array         # (N,) ||adv - x||_2 per sample (over all H*W*C values)
    adv_pred: jax.Array   # (N,) int32 top-1 of the model on adv
    label: jax.Array      # (N,) int32 the label used (given true label, or the clean prediction)
    target: Optional[jax.Array] = None      # (N,) int32 targets of a targeted attack, else None
    iterations: Optional[jax.Array] = None  # (N,) int32 iterations spent per sample, where meaningful


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------

def is_concrete(a) -> bool:
    return not isinstance(a, jax.core.Tracer)


def check_images(x, name: str = "x") -> jax.Array:
    """(B, H, W, C) float images in [0, 1]; value checks only for concrete arrays."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array of images (B, H, W, C), got {type(x).__name__}")
    if len(x.shape) != 4:
        raise ValueError(f"{name} must be a batch of NHWC images (B, H, W, C) in pixel space [0, 1], "
                         f"got shape {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating-point images in [0, 1], got dtype {x.dtype} "
                        "(convert uint8 images with x.astype('float32') / 255)")
    if is_concrete(x):
        a = np.asarray(x)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(a)))} NaN/inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} must be pixel-space images in [0, 1] (normalization happens inside "
                             f"the model), got values in [{lo:.4g}, {hi:.4g}]")
    return jnp.asarray(x)


def check_labels(y, batch: int, name: str, num_classes: int | None = None) -> jax.Array | None:
    """None, or a (batch,) integer array (range-checked when concrete and num_classes is known)."""
    if y is None:
        return None
    if not hasattr(y, "shape"):
        y = np.asarray(y)
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one class per image), got {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}")
    if is_concrete(y) and num_classes is not None:
        a = np.asarray(y)
        if a.min() < 0 or a.max() >= num_classes:
            raise ValueError(f"{name} must be class indices in [0, {num_classes}), "
                             f"got values in [{a.min()}, {a.max()}]")
    return jnp.asarray(y, jnp.int32)


def check_positive(value, name: str) -> None:
    if value is None or not is_concrete(value):
        return
    v = np.asarray(value)
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"{name} must be > 0 (in [0, 1] pixel units), got {value}")


def check_nonnegative(value, name: str) -> None:
    """A finite number >= 0 (inf passes a bare ``>= 0`` and turns the attack's arithmetic into NaN)."""
    if not is_concrete(value):
        return
    try:
        v = None if isinstance(value, bool) else np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        v = None
    if v is None or not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def num_classes_of(logits_fn: LogitsFn, x: jax.Array) -> int:
    """Number of classes, from the logits' shape (traces the model once, computes nothing)."""
    out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if len(out.shape) != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"logits_fn must map (B, H, W, C) images to (B, classes) logits, "
                         f"got output shape {out.shape} for input {tuple(x.shape)}")
    return int(out.shape[1])


def check_logits_fn(logits_fn) -> None:
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable x -> logits, got {type(logits_fn).__name__}")


def prepare(logits_fn: LogitsFn, x, label=None, target=None):
    """Common boundary checks: returns (logits_fn, x, label, target, num_classes).

    The returned ``logits_fn`` is :func:`jaxroute.utils.conv_grads.loop_friendly`
    (fast convolution gradients inside XLA:CPU loops).
    """
    check_logits_fn(logits_fn)
    x = check_images(x)
    k = num_classes_of(logits_fn, x)
    label = check_labels(label, x.shape[0], "label", k)
    target = check_labels(target, x.shape[0], "target", k)
    return loop_friendly(logits_fn), x, label, target, k


def resolve_config(cls, config):
    """``config`` itself (type-checked), or the defaults ``cls()`` when None."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


# --------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------

def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-sample softmax cross-entropy with integer labels, (B,)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def per_sample(fn, a: jax.Array) -> jax.Array:
    return fn(a.reshape(a.shape[0], -1), axis=1)


def l2_norm(a: jax.Array) -> jax.Array:
    return jnp.sqrt(per_sample(jnp.sum, jnp.square(a)))


def linf_norm(a: jax.Array) -> jax.Array:
    return per_sample(jnp.max, jnp.abs(a))


def bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
    return v.reshape((v.shape[0],) + (1,) * (like.ndim - 1))


def ce_grad(logits_fn: LogitsFn, x: jax.Array, y: jax.Array):
    """Per-sample gradients of CE(y, f(x)) w.r.t. x (one forward + one backward), and the logits."""
    logits, vjp = jax.vjp(logits_fn, x)
    g_logits = jax.grad(lambda z: jnp.sum(cross_entropy(z, y)))(logits)
    (g,) = vjp(g_logits.astype(logits.dtype))
    return g, logits


def predict(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    return jnp.argmax(logits_fn(x), axis=-1).astype(jnp.int32)


def finish(logits_fn: LogitsFn, x: jax.Array, adv: jax.Array, label: jax.Array,
           target: jax.Array | None, iterations: jax.Array | None = None,
           adv_pred: jax.Array | None = None) -> AttackResult:
    """Evaluate the adversarials (one forward pass unless adv_pred is given) and measure them."""
    if adv_pred is None:
        adv_pred = predict(logits_fn, adv)
    success = (adv_pred == target) if target is not None else (adv_pred != label)
    d = adv - x
    return AttackResult(adv=adv, success=success, linf=linf_norm(d), l2=l2_norm(d),
                        adv_pred=adv_pred, label=label, target=target, iterations=iterations)


# --------------------------------------------------------------------------
# live-row compaction for loops with per-sample early stopping
# --------------------------------------------------------------------------

def compaction_widths(b: int, factor: int | None) -> list[int]:
    """Static batch widths b, ceil(b/factor), ceil(b/factor²), ..., 1 (descending, distinct).

    ``factor=None``: only b (no compaction).
    """
    out = [b]
    while factor is not None and out[-1] > 1:
        out.append(-(-out[-1] // factor))
    return out


def step_live_rows(step: Callable, state, live: jax.Array, widths: list[int]):
    """One iteration of ``step`` that costs about the number of live rows, not B.

    Loops with per-sample early stopping (DeepFool, CW) keep static shapes,
    so a plain loop pays for all B rows on every iteration the slowest
    sample needs.  Here the live rows are gathered into the smallest static
    width of ``widths`` (descending, ``widths[0] == B``; see
    :func:`compaction_widths`) that holds them, ``step`` runs on that
    gather, and its rows are scattered back (``lax.switch`` between one
    compiled step per width).  Every live row still advances by exactly one
    iteration, so the result equals the uncompacted loop's up to float
    rounding of the smaller batch.

    ``state``: a pytree; leaves whose leading axis is B are per-sample rows
    (gathered and scattered), other leaves (e.g. an iteration counter or
    Adam's step count) are shared, passed whole and taken from ``step``'s
    output.  ``step(state, live) -> state`` must leave rows with
    ``live=False`` unchanged (padding rows are passed with ``live=False``
    and dropped); leaves it returns as they came (the same object, e.g.
    per-sample constants kept by ``{**state, ...}``) are not scattered back.
    """
    b = live.shape[0]
    leaves, treedef = jax.tree.flatten(state)
    rowwise = [leaf.ndim >= 1 and leaf.shape[0] == b for leaf in leaves]

    def branch(w):
        def run(leaves, live):
            if w == b:     # the full batch: no gather
                return jax.tree.leaves(step(treedef.unflatten(leaves), live))
            sel = jnp.nonzero(live, size=w, fill_value=b)[0]   # live rows, then b = padding
            g = jnp.minimum(sel, b - 1)
            sub = [leaf[g] if r else leaf for leaf, r in zip(leaves, rowwise)]
            out = jax.tree.leaves(step(treedef.unflatten(sub), live[g] & (sel < b)))
            # rows ``step`` passed through untouched (per-sample constants) need no scatter back
            return [o if not r else leaf if o is s else leaf.at[sel].set(o, mode="drop")
                    for leaf, s, o, r in zip(leaves, sub, out, rowwise)]
        return run

    if len(widths) == 1:
        return treedef.unflatten(branch(widths[0])(leaves, live))
    n_live = jnp.sum(live).astype(jnp.int32)
    k = jnp.sum(jnp.asarray(widths, jnp.int32) >= n_live) - 1   # the smallest width holding them
    return treedef.unflatten(jax.lax.switch(k, [branch(w) for w in widths], leaves, live))
