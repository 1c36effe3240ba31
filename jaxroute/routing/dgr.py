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

Which iterates are considered (``DGRConfig.iterates``).  ``"after_step"``
(default): Λ_0 = 1 (the full net) is the fallback and Λ_1..Λ_T are
candidates: the forward pass of step t evaluates Λ_t's loss and prediction
while computing its gradient, and one extra forward pass after the loop
evaluates Λ_T.  ``"official"``: the official release's rule, Λ_0..Λ_{T-1}
evaluated before each step, Λ_0 competing on loss like any other iterate
(it never considers the last update).  The paper's text fits both.

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

import jax
import jax.numpy as jnp
import optax

from jaxroute.routing.route import Route
from jaxroute.utils.checks import check_finite, check_int
from jaxroute.utils.conv_grads import loop_friendly


ITERATE_RULES = ("after_step", "official")


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
    iterates: str = "after_step"   # or "official": Λ_0..Λ_{T-1}, Λ_0 competing (see the module doc)

    def __post_init__(self):
        if self.iterates not in ITERATE_RULES:
            raise ValueError(f"DGR iterates must be one of {ITERATE_RULES}, got {self.iterates!r}")
        object.__setattr__(self, "steps", check_int(self.steps, "DGR steps"))   # a Python int for the manifests
        for name in ("lr", "momentum", "gamma", "clip_min", "clip_max"):
            check_finite(getattr(self, name), f"DGR {name}")
        if not self.lr > 0:
            raise ValueError(f"DGR lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"DGR momentum must be in [0, 1), got {self.momentum}")
        if self.gamma < 0:
            raise ValueError(f"DGR gamma must be >= 0, got {self.gamma}")
        if self.clip_min < 0:
            # a gate scales its channel: a negative one would flip it, and a path's sparsity counts gates > 0
            raise ValueError(f"DGR clip_min must be >= 0, got {self.clip_min}")
        if not self.clip_min < self.clip_max:
            raise ValueError(f"need clip_min < clip_max, got [{self.clip_min}, {self.clip_max}]")

    def optimizer(self) -> optax.GradientTransformation:
        # No weight decay: the L1 term is the only regulariser, as in the paper.
        return optax.sgd(self.lr, momentum=self.momentum)


def dgr_loss(logits: jax.Array, p: jax.Array, flat_gates: jax.Array, gamma: float):
    """Per-sample DGR loss: distillation cross-entropy + γ·L1 (both (B,))."""
    ce = -jnp.sum(p * jax.nn.log_softmax(logits), axis=-1)
    return ce + gamma * jnp.sum(jnp.abs(flat_gates), axis=-1), ce


def dgr_route(model, x: jax.Array, *, config: DGRConfig = DGRConfig(),
              optimizer: optax.GradientTransformation | None = None) -> Route:
    """Route a batch with DGR.  Pure and jittable (``config``/``optimizer`` static).

    ``model`` is a :class:`~jaxroute.models.GatedModel` (or any object with
    its ``spec`` and ``logits(x, gates)``); its logits must treat samples
    independently (inference-mode BN, no cross-sample ops).
    ``optimizer`` replaces the config's SGD (any optax transformation).
    """
    return _dgr(model, x, config, optimizer)[0]


def dgr_trace(model, x: jax.Array, *, config: DGRConfig = DGRConfig()) -> tuple[Route, jax.Array]:
    """:func:`dgr_route` plus the density (fraction of gates > 0) of every iterate Λ_0..Λ_T, (B, T + 1).

    Shows where along the optimisation the kept paths lose their gates.
    """
    route, trace, _ = _dgr(model, x, config, None, trace=True)
    return route, trace


def dgr_route_pair(model, x: jax.Array, x_next: jax.Array, *,
                   config: DGRConfig = DGRConfig()) -> tuple[Route, Route]:
    """Route ``x``, then ``x_next`` with the optimizer state (SGD momentum) carried over.

    The official release routes an image and then its adversarial twin with one
    optimizer: the gates are reset to 1 but the momentum buffer is not, so the
    second routing starts with the first one's momentum.  This reproduces that
    for comparison; :func:`dgr_route` (a fresh optimizer per image) is what the
    paper describes.
    """
    first, _, state = _dgr(model, x, config, None)
    second, _, _ = _dgr(model, x_next, config, None, init_state=state)
    return first, second


def _dgr(model, x, config: DGRConfig, optimizer, trace: bool = False, init_state=None):
    """(Route, per-iterate densities or None, final optimizer state)."""
    opt = config.optimizer() if optimizer is None else optimizer
    spec = model.spec
    logits_fn = loop_friendly(lambda g, x: model.logits(x, g))
    b = x.shape[0]
    d = spec.size

    def forward(g):
        return logits_fn(spec.split(g), x)

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

    def consider(best, g, logits, t):
        best_g, best_logits, best_loss, best_t = best
        loss, _ = dgr_loss(logits, p, g, config.gamma)
        ok = (jnp.argmax(logits, -1) == pred) & (loss < best_loss)
        return (jnp.where(ok[:, None], g, best_g), jnp.where(ok[:, None], logits, best_logits),
                jnp.where(ok, loss, best_loss), jnp.where(ok, t, best_t))

    state = jax.vmap(opt.init)(ones) if init_state is None else init_state
    # Step 0: the CE gradient is exactly zero at Λ = 1 (p == q), see module doc.
    g, state = update(ones, state, jnp.zeros_like(ones))
    official = config.iterates == "official"
    # Λ_0 is the fallback (loss +inf, so any valid iterate replaces it) or, officially, a candidate.
    best = (ones, full_logits, init_loss if official else jnp.full((b,), jnp.inf, x.dtype),
            jnp.zeros((b,), jnp.int32))

    def step(carry, t):
        g, state, best = carry
        (_, logits), ce_grad = jax.value_and_grad(ce_sum, has_aux=True)(g)
        best = consider(best, g, logits, t)  # iterate t, evaluated by the forward of step t
        g_next, state = update(g, state, ce_grad)
        return (g_next, state, best), (jnp.mean(g > 0, axis=-1) if trace else None)

    ts = jnp.arange(1, config.steps, dtype=jnp.int32)
    (g, state, best), density = jax.lax.scan(step, (g, state, best), ts)
    if not official:
        best = consider(best, g, forward(g), jnp.int32(config.steps))  # the last iterate Λ_T
    # Where nothing was found the carry still holds Λ_0 = 1 and the full logits.
    best_g, gated_logits, best_loss, best_t = best
    found = best_t > 0
    best_loss = jnp.where(found, best_loss, init_loss)
    route = Route(
        cdrp=best_g, loss=best_loss, fell_back=~found, iterations=best_t, pred=pred,
        gated_pred=jnp.argmax(gated_logits, -1), gated_logits=gated_logits, full_logits=full_logits,
    )
    if trace:  # Λ_0 = 1, Λ_1..Λ_{T-1} (the scan records each step's input), Λ_T
        density = jnp.concatenate([jnp.ones((b, 1), x.dtype), density.T.astype(x.dtype),
                                   jnp.mean(g > 0, -1)[:, None].astype(x.dtype)], axis=1)
    return route, density, state
