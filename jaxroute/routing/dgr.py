"""Distillation Guided Routing (Wang et al., CVPR 2018, Algorithm 1), batched.

For every input x separately: p = softmax(f(x)); gates Λ (one vector per
gate point, all ones at start) minimise

    L(Λ) = -Σ_i p_i log q_i(Λ) + γ Σ_k ||λ_k||_1,   q = softmax(f(x; Λ))

by T steps of SGD (lr 0.1, momentum 0.9) on the gates only, the L1 term by
its subgradient γ·sign(Λ), clipping Λ to [clip_min, clip_max] after each
step.  Among the iterates whose top-1 prediction equals the original one,
the gates with the lowest loss are kept; if there is none, all ones.

Batched formulation.  The B samples' gates form one (B, D) matrix.  Because
the network runs in inference mode, sample b's loss depends only on row b,
so the gradient of the *summed* loss is exactly the stack of per-sample
gradients: one batched forward/backward per step serves every sample.  The
optimizer is an optax transformation applied per sample with ``jax.vmap``
(its state is per sample too), so swapping in any optax optimizer keeps
samples independent.  All T steps run inside one ``lax.scan`` in one
compiled program: no host synchronisation inside the loop.

Which iterates are considered.  Λ_0 = 1 (the full net) is the fallback.
Λ_1..Λ_T are candidates: the forward pass of step t evaluates Λ_t's loss and
prediction while computing its gradient, and one extra forward pass after
the loop evaluates Λ_T.  (The official release evaluates Λ_0..Λ_{T-1},
before each step, so it never considers the last update; ours considers it
and costs one forward pass per sample more.)

Step 0 needs no backward pass: at Λ_0 = 1 the distillation target p equals
q, and the gradient of the cross-entropy -Σ p log q w.r.t. the logits is
q - p = 0; the first update is driven by the L1 subgradient alone.  We use
that identity (exact, up to float rounding of a quantity that is zero) and
so run T-1 forward/backward passes plus two forward passes.

Speed.  On the CPU backend the logits function is wrapped with
:func:`jaxroute.utils.conv_grads.loop_friendly`, which keeps XLA:CPU's
convolution input gradients on its fast path inside the scan (5.4x faster
steps on ResNet-20 at batch 128; same math).  On a CPU, give XLA one device per core and
shard the batch over them (:mod:`jaxroute.utils.devices`, or the
``jaxroute`` command, which does both): per-core devices run 1.5x faster
than one device whose ops are split over the cores.
``benchmarks/README.md`` has the measurements, including what did not help.

Deviation: none in the algorithm; defaults are the paper's (T=30, lr 0.1,
momentum 0.9, clip [0, 10]).  γ defaults to 0.05.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxroute.models.gates import GateSpec, unflatten_gates
from jaxroute.utils.conv_grads import loop_friendly

LogitsFn = Callable[[dict, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class DGRConfig:
    """Hyper-parameters of DGR; defaults are the paper's.

    The official release clips to [0, 5] for VGG/AlexNet and [0, 100] for
    ResNets; the paper states [0, 10].
    """

    steps: int = 30
    lr: float = 0.1
    momentum: float = 0.9
    gamma: float = 0.05
    clip_min: float = 0.0
    clip_max: float = 10.0

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"DGR steps must be >= 1, got {self.steps}")
        if not self.clip_min < self.clip_max:
            raise ValueError(f"need clip_min < clip_max, got [{self.clip_min}, {self.clip_max}]")
        if self.gamma < 0 or self.lr <= 0:
            raise ValueError(f"need gamma >= 0 and lr > 0, got gamma={self.gamma}, lr={self.lr}")

    def optimizer(self) -> optax.GradientTransformation:
        # No weight decay: the L1 term is the only regulariser, as in the paper.
        return optax.sgd(self.lr, momentum=self.momentum)


class RouteResult(NamedTuple):
    """Per-sample routing output; every field has the batch as leading axis."""

    cdrp: jax.Array        # (B, D) kept gates, forward order (the CDRP)
    loss: jax.Array        # (B,) loss of the kept gates
    fell_back: jax.Array   # (B,) True where no optimised iterate kept the top-1 (all ones kept)
    pred: jax.Array        # (B,) top-1 of the full model
    gated_pred: jax.Array  # (B,) top-1 of the gated model with the kept gates
    gated_logits: jax.Array  # (B, K) logits with the kept gates
    full_logits: jax.Array   # (B, K) logits of the full model

    def gates(self, spec: GateSpec) -> dict:
        """The kept gates as a gate tree of (B, C) arrays."""
        return unflatten_gates(spec, self.cdrp)


def dgr_loss(logits: jax.Array, p: jax.Array, flat_gates: jax.Array, gamma: float):
    """Per-sample DGR loss: distillation cross-entropy + γ·L1 (both (B,))."""
    ce = -jnp.sum(p * jax.nn.log_softmax(logits), axis=-1)
    return ce + gamma * jnp.sum(jnp.abs(flat_gates), axis=-1), ce


def dgr_route(
    logits_fn: LogitsFn,
    spec: GateSpec,
    x: jax.Array,
    config: DGRConfig = DGRConfig(),
    optimizer: optax.GradientTransformation | None = None,
) -> RouteResult:
    """Route a batch with DGR.  Pure and jittable (``config``/``optimizer`` static).

    ``logits_fn(gates, x)`` must treat samples independently (inference-mode
    BN, no cross-sample ops) and accept a gate tree of (B, C) arrays.
    """
    opt = config.optimizer() if optimizer is None else optimizer
    logits_fn = loop_friendly(logits_fn)
    b = x.shape[0]
    d = spec.size

    def forward(g):
        return logits_fn(unflatten_gates(spec, g), x)

    ones = jnp.ones((b, d), x.dtype)
    full_logits = forward(ones)
    p = jax.nn.softmax(full_logits)
    pred = jnp.argmax(full_logits, -1)
    init_loss, _ = dgr_loss(full_logits, p, ones, config.gamma)

    def ce_sum(g):
        logits = forward(g)
        _, ce = dgr_loss(logits, p, g, 0.0)
        return ce.sum(), logits

    def clip(g):
        return jnp.clip(g, config.clip_min, config.clip_max)

    def update(g, state, ce_grad):
        grad = ce_grad + config.gamma * jnp.sign(g)
        upd, state = jax.vmap(opt.update)(grad, state, g)
        return clip(optax.apply_updates(g, upd)), state

    def consider(best, g, logits):
        best_g, best_logits, best_loss, found = best
        loss, _ = dgr_loss(logits, p, g, config.gamma)
        ok = (jnp.argmax(logits, -1) == pred) & (loss < best_loss)
        return (jnp.where(ok[:, None], g, best_g), jnp.where(ok[:, None], logits, best_logits),
                jnp.where(ok, loss, best_loss), found | ok)

    state = jax.vmap(opt.init)(ones)
    # Step 0: the CE gradient is exactly zero at Λ = 1 (p == q), see module doc.
    g, state = update(ones, state, jnp.zeros_like(ones))
    best = (ones, full_logits, jnp.full((b,), jnp.inf, x.dtype), jnp.zeros((b,), bool))

    def step(carry, _):
        g, state, best = carry
        (_, logits), ce_grad = jax.value_and_grad(ce_sum, has_aux=True)(g)
        best = consider(best, g, logits)  # iterate t, evaluated by the forward of step t
        g, state = update(g, state, ce_grad)
        return (g, state, best), None

    (g, state, best), _ = jax.lax.scan(step, (g, state, best), None, length=config.steps - 1)
    best = consider(best, g, forward(g))  # the last iterate Λ_T
    # Where nothing was found the carry still holds Λ_0 = 1 and the full logits.
    best_g, gated_logits, best_loss, found = best
    best_loss = jnp.where(found, best_loss, init_loss)
    return RouteResult(
        cdrp=best_g, loss=best_loss, fell_back=~found, pred=pred,
        gated_pred=jnp.argmax(gated_logits, -1), gated_logits=gated_logits, full_logits=full_logits,
    )
