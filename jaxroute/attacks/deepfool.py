"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016), L2, batched with per-sample early stopping.

For each sample, with label y (the clean prediction, or a given label) and
candidate classes k ≠ y, every iteration linearises the classifier at the
current iterate x_i:

    w_k = ∇f_k(x_i) - ∇f_y(x_i),   f'_k = f_k(x_i) - f_y(x_i)
    l̂   = argmin_k |f'_k| / ||w_k||₂
    r_i = (|f'_l̂| / ||w_l̂||₂ + 1e-4) · w_l̂ / ||w_l̂||₂   (the reference code adds 1e-4
                                                    to the step's length, ``pert + 1e-4``)

and updates

* ``update="original"`` (the authors' reference code, LTS4/DeepFool
  ``deepfool.py``): r_tot += r_i, x_{i+1} = Π_[0,1](x + (1 + overshoot) · r_tot).
  Deviation: the reference code does not clip; here every iterate is
  clipped to the valid pixel range [0, 1], as in torchattacks;
* ``update="torchattacks"`` (``torchattacks.DeepFool``): no 1e-4 term and
  x_{i+1} = Π_[0,1](x_i + (1 + overshoot) · r_i).

A sample is done as soon as its prediction at the current iterate differs
from y; done samples are frozen (they never change again).  The whole
batch runs in ONE compiled ``lax.while_loop`` that ends when every sample
is done or after ``max_iter`` iterations; each iteration is one forward
pass plus K backward passes for the K candidate-class gradients (``vmap``
of the ``vjp`` over one-hot cotangents) over the samples still live.

Compaction.  Most samples finish in 2-4 iterations, a few need tens (with
``update="torchattacks"`` an iterate whose step is clipped at the pixel
range creeps towards the boundary; measured on CIFAR-10: 38 of up to 50).
Shapes are static, so a loop over the full batch would pay B·(1 + K)
passes for every iteration the slowest sample needs.  Instead each
iteration gathers the live samples into the smallest of the static widths
B, ⌈B/c⌉, ⌈B/c²⌉, ..., 1 that holds them (``compaction=c``, default 4;
``lax.switch`` between one compiled step per width;
:func:`~jaxroute.attacks.core.step_live_rows`), runs the step on
them and scatters the results back: the cost follows the live count
(at most c times it) and every live sample still advances by exactly one
update per iteration, so the results are those of the uncompacted loop
(up to float rounding of the smaller batch).
``compaction=None`` always runs the full batch (one compiled step).

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
    AttackResult, LogitsFn, bcast, check_nonnegative, compaction_widths, finish, prepare, resolve_config,
    step_live_rows,
)
from jaxroute.utils.checks import check_int


@dataclasses.dataclass(frozen=True)
class DeepFoolConfig:
    overshoot: float = 0.02
    max_iter: int = 50
    num_candidates: int | None = None
    update: Literal["original", "torchattacks"] = "original"
    compaction: int | None = 4

    def __post_init__(self):
        check_nonnegative(self.overshoot, "overshoot")
        check_int(self.max_iter, "max_iter")
        if self.num_candidates is not None:
            check_int(self.num_candidates, "num_candidates", minimum=2)
        if self.update not in ("original", "torchattacks"):
            raise ValueError(f"update must be 'original' or 'torchattacks', got {self.update!r}")
        if self.compaction is not None:
            check_int(self.compaction, "compaction", minimum=2)


def deepfool(logits_fn: LogitsFn, x: jax.Array, *, label: jax.Array | None = None,
             target: jax.Array | None = None, key: jax.Array | None = None,
             config: DeepFoolConfig | None = None) -> AttackResult:
    """Untargeted L2 DeepFool (see the module docstring for the exact update).

    ``label=None``: y is the clean prediction (the paper's setting); with a
    given label, samples the model already misclassifies are done at
    iteration 0 with a zero perturbation (as in torchattacks).
    ``AttackResult.iterations`` holds each sample's number of updates.
    """
    if target is not None:
        raise ValueError("deepfool is untargeted; it takes no target")
    cfg = resolve_config(DeepFoolConfig, config)
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

    def step(rows, live):
        """One DeepFool step on a (w, ...) gather of samples; rows not live stay unchanged."""
        xs, r_s = rows["x"], rows["r_tot"]
        w = xs.shape[0]
        eye = jnp.broadcast_to(jnp.eye(kc, dtype=logits0.dtype)[:, None, :], (kc, w, kc))

        def fwd(xi):
            full = logits_fn(xi)
            return jnp.take_along_axis(full, rows["cand"], axis=1), full

        zc, vjp, full = jax.vjp(fwd, xs, has_aux=True)
        live = live & (jnp.argmax(full, axis=-1) == rows["label"])       # done: the label changed
        jac = jax.vmap(lambda ct: vjp(ct)[0])(eye)                        # (K, w, H, W, C)
        jac = jnp.moveaxis(jac, 0, 1)                                     # (w, K, H, W, C)
        wk = jac[:, 1:] - jac[:, :1]                                      # (w, K-1, H, W, C)
        f = zc[:, 1:] - zc[:, :1]                                         # (w, K-1)
        wn2 = jnp.sum(jnp.square(wk.reshape(w, kc - 1, -1)), axis=-1)     # (w, K-1)
        value = jnp.abs(f) / jnp.maximum(jnp.sqrt(wn2), 1e-12)
        l = jnp.argmin(value, axis=1)
        f_l = jnp.take_along_axis(f, l[:, None], axis=1)[:, 0]
        wn2_l = jnp.take_along_axis(wn2, l[:, None], axis=1)[:, 0]
        w_l = jnp.take_along_axis(wk, l[:, None, None, None, None], axis=1)[:, 0]
        if cfg.update == "original":
            wn_l = jnp.maximum(jnp.sqrt(wn2_l), 1e-12)
            r_i = w_l * bcast((jnp.abs(f_l) / wn_l + 1e-4) / wn_l, w_l)
            r_new = r_s + r_i
            x_new = jnp.clip(rows["x0"] + (1.0 + cfg.overshoot) * r_new, 0.0, 1.0)
        else:
            r_i = w_l * bcast(jnp.abs(f_l) / jnp.maximum(wn2_l, 1e-24), w_l)
            r_new = r_s + r_i
            x_new = jnp.clip(xs + (1.0 + cfg.overshoot) * r_i, 0.0, 1.0)
        keep = bcast(live, xs)
        return {**rows, "x": jnp.where(keep, x_new, xs), "r_tot": jnp.where(keep, r_new, r_s),
                "done": rows["done"] | ~live, "iters": rows["iters"] + live.astype(jnp.int32)}

    widths = compaction_widths(b, cfg.compaction)

    def cond(state):
        i, rows = state
        return (i < cfg.max_iter) & ~jnp.all(rows["done"])

    def body(state):
        i, rows = state
        return i + 1, step_live_rows(step, rows, ~rows["done"], widths)

    done0 = jnp.argmax(logits0, axis=-1) != label                         # already misclassified
    rows = {"x": x, "x0": x, "r_tot": jnp.zeros_like(x), "label": label, "cand": cand, "done": done0,
            "iters": jnp.zeros((b,), jnp.int32)}
    _, rows = jax.lax.while_loop(cond, body, (jnp.int32(0), rows))
    return finish(logits_fn, x, rows["x"], label, None, iterations=rows["iters"])
