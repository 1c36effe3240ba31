"""Adaptive Weight Routing (AWR) and Adaptive Activation Routing (AAR).

The pruning baselines of the DGR paper (§4.1): "the remaining weights or
output channels are ranked ... and 2% of them with least norms are pruned",
iteration after iteration, and "the final CDRPs selection criterion is
exactly the same" as DGR's.  Channels are ranked within each gate layer by
the ℓ1 norm of the weights producing them (AWR) or by their mean |activation|
in the current, already pruned network (AAR).  Gates are binary.

``PruneConfig`` (defaults = the published rule):

* ``rule="remaining"``: each iteration prunes ``frac`` of each layer's
  *remaining* channels.  Whole channels only, so the count is accumulated:
  after iteration i a layer of C channels has round(C·(1 − (1 − frac)^i))
  pruned -- a 16-channel layer is not frozen by 2% of it being less than one
  channel.  ``rule="linear"``: ``frac`` of *all* channels per iteration
  (round(frac·C·i) pruned after iteration i; everything after 1/frac).
* ``select="lowest_loss"``: among the iterates that keep the full model's
  top-1, the one with the lowest DGR loss, distillation cross-entropy +
  γ·‖Λ‖₁ (γ = ``gamma``, DGR's default); all ones if none.
  ``select="last"``: the last iterate before the top-1 changes.
* AWR's channel norm includes the scale of the BN that follows the layer,
  |γ_c| / sqrt(var_c + ε) (``bn_scale=True``): with BN the kernel norm alone
  says nothing about the channel's output magnitude.  A residual block's
  output is ranked by its last conv (and BN), whose output the sum carries.

A sample stops when its top-1 changes (or nothing is left to prune); the
loop ends when every sample has stopped.  Batched like DGR: every sample has
its own (B, D) mask and one forward pass per iteration serves all of them
(for AAR it also yields the activations that rank the next iteration).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxroute.models.base import flax_path
from jaxroute.models.gates import GateSpec, flatten_gates
from jaxroute.routing.route import Route
from jaxroute.utils.checks import check_int

PRUNE_RULES = ("remaining", "linear")
SELECT_RULES = ("lowest_loss", "last")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """AWR/AAR hyper-parameters (see the module doc); defaults are the published rule."""

    frac: float = 0.02
    rule: str = "remaining"
    select: str = "lowest_loss"
    gamma: float = 0.05             # the L1 weight of the lowest-loss selection (DGR's default)
    bn_scale: bool = True           # AWR: include the following BN's scale in a channel's weight norm
    max_iters: int | None = None    # default: enough to prune every channel

    def __post_init__(self):
        if isinstance(self.frac, bool) or not isinstance(self.frac, (int, float)) or not 0 < self.frac < 1:
            raise ValueError(f"the pruning fraction must be in (0, 1), got {self.frac!r}")
        if self.rule not in PRUNE_RULES:
            raise ValueError(f"rule must be one of {PRUNE_RULES}, got {self.rule!r}")
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {SELECT_RULES}, got {self.select!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not (
                math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        object.__setattr__(self, "max_iters", check_int(self.max_iters, "max_iters", allow_none=True))

    def iterations(self, spec: GateSpec) -> int:
        """Iterations that prune every channel of the widest layer (or ``max_iters``)."""
        if self.max_iters is not None:
            return self.max_iters
        if self.rule == "linear":
            return math.ceil(1 / self.frac)
        # the first i with round(C (1 - frac)^i) == 0, i.e. (1 - frac)^i < 0.5 / C
        return math.ceil(math.log(0.5 / max(spec.channels)) / math.log(1 - self.frac))

    def pruned_after(self, c: int, it):
        """Channels of a c-channel layer pruned after ``it`` iterations."""
        if self.rule == "linear":
            return jnp.minimum(jnp.round(self.frac * c * it), c)
        return jnp.minimum(jnp.round(c * (1 - (1 - self.frac) ** it)), c)


def _node(tree, dotted: str):
    node = tree
    for p in flax_path(dotted):
        if p not in node:
            return None
        node = node[p]
    return node


def weight_l1_scores(variables: dict, spec: GateSpec, bn_scale: bool = True) -> jax.Array:
    """(D,) l1 norm of the weights that produce each gated channel (times the BN scale after them).

    A gate point named after a conv/linear layer uses that layer's kernel; a
    residual block's output (e.g. ``layer1.0``) uses the block's last conv,
    whose output the residual sum carries.  With ``bn_scale`` the norm is
    multiplied by |γ| / sqrt(var + 1e-5) of the BN that normalizes that
    layer's output (``convK`` -> ``bnK``; ``features_i`` -> ``features_{i+1}``),
    where there is one.
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    out = []
    for name, c in spec:
        node = _node(params, name)
        if node is None:
            raise ValueError(f"AWR: no parameters for gate point {name!r}")
        layer = flax_path(name)
        if "kernel" not in node:
            convs = sorted(k for k in node if k.startswith("conv") and "kernel" in node[k])
            if not convs:
                raise ValueError(f"AWR: cannot find the layer producing gate point {name!r}")
            layer = layer + (convs[-1],)
            node = node[convs[-1]]
        k = jnp.asarray(node["kernel"])
        s = jnp.sum(jnp.abs(k), axis=tuple(range(k.ndim - 1)))
        if s.shape != (c,):
            raise ValueError(f"AWR: kernel of {name!r} has {s.shape[0]} outputs, gate point has {c}")
        if bn_scale:
            s = s * _bn_factor(params, stats, layer, c)
        out.append(s)
    return jnp.concatenate(out)


def _bn_factor(params, stats, layer: tuple[str, ...], c: int):
    """|γ| / sqrt(var + eps) of the BN after ``layer`` (a Flax path), or 1 where there is none."""
    *head, last = layer
    if last.startswith("conv"):
        bn = (*head, "bn" + last[4:])
    elif "_" in last and last.rsplit("_", 1)[1].isdigit():
        stem, i = last.rsplit("_", 1)
        bn = (*head, f"{stem}_{int(i) + 1}")
    else:
        return 1.0
    p, st = params, stats
    for part in bn:
        p, st = (p or {}).get(part), (st or {}).get(part)
    if not p or "scale" not in p or not st or "var" not in st or jnp.shape(p["scale"]) != (c,):
        return 1.0
    return jnp.abs(jnp.asarray(p["scale"])) / jnp.sqrt(jnp.asarray(st["var"]) + 1e-5)


def activation_l1_scores(acts: dict, spec: GateSpec) -> jax.Array:
    """(B, D) mean |activation| of every channel at every gate point."""
    return flatten_gates(spec, {n: jnp.mean(jnp.abs(a), axis=tuple(range(1, a.ndim - 1)))
                                for n, a in acts.items()})


def _prune_to(mask, scores, spec: GateSpec, config: PruneConfig, it):
    """Prune the lowest-scored active channels until each layer has ``config.pruned_after`` pruned."""
    # Pruned channels sort first, then active ones by ascending score.
    key = jnp.where(mask > 0, scores, -jnp.inf)
    new = []
    for c, o in zip(spec.channels, spec.offsets):
        n_pruned = config.pruned_after(c, it)[:, None]  # it: (B,)
        rank = jnp.argsort(jnp.argsort(key[:, o : o + c], axis=-1), axis=-1)
        new.append(jnp.where(rank < n_pruned, 0.0, mask[:, o : o + c]))
    return jnp.concatenate(new, axis=-1)


def awr_route(model, x: jax.Array, *, config: PruneConfig = PruneConfig()) -> Route:
    """Adaptive Weight Routing: channels ranked by the l1 norm of their weights."""
    return _prune_route(model, x, "awr", config)


def aar_route(model, x: jax.Array, *, config: PruneConfig = PruneConfig()) -> Route:
    """Adaptive Activation Routing: channels ranked by their mean |activation| in the pruned network."""
    return _prune_route(model, x, "aar", config)


def _prune_route(model, x: jax.Array, method: str, config: PruneConfig) -> Route:
    """Pure, jittable; ``model`` is a GatedModel (its ``spec``, ``capture`` and, for AWR, ``variables``)."""
    spec = model.spec
    b, d = x.shape[0], spec.size
    ones = jnp.ones((b, d), x.dtype)
    full = model.capture(x, ones)
    p = jax.nn.softmax(full.logits)
    pred = jnp.argmax(full.logits, -1)
    weight_scores = weight_l1_scores(model.variables, spec, config.bn_scale) if method == "awr" else None
    lowest = config.select == "lowest_loss"

    def scores_of(acts):
        if method == "aar":
            return activation_l1_scores(acts, spec)
        return jnp.broadcast_to(weight_scores, (b, d))

    def loss_of(logits, mask):
        ce = -jnp.sum(p * jax.nn.log_softmax(logits), axis=-1)
        return ce + config.gamma * jnp.sum(mask, axis=-1), ce

    def cond(carry):
        *_, active, n, it = carry
        return jnp.any(active) & (it < config.iterations(spec))

    def body(carry):
        mask, scores, best, active, n, it = carry
        cand = _prune_to(mask, scores, spec, config, n + 1)
        c = model.capture(x, cand)
        # a sample goes on while its top-1 holds and the step still pruned something
        ok = active & (jnp.argmax(c.logits, -1) == pred) & jnp.any(cand != mask, axis=-1)
        mask = jnp.where(ok[:, None], cand, mask)
        scores = jnp.where(ok[:, None], scores_of(c.acts), scores)
        best_mask, best_logits, best_loss, best_n = best
        loss, _ = loss_of(c.logits, cand)
        keep = ok & (loss < best_loss) if lowest else ok
        best = (jnp.where(keep[:, None], cand, best_mask), jnp.where(keep[:, None], c.logits, best_logits),
                jnp.where(keep, loss, best_loss), jnp.where(keep, n + 1, best_n))
        return mask, scores, best, ok, n + ok, it + 1

    no_candidate = jnp.full((b,), jnp.inf, x.dtype)
    best0 = (ones, full.logits, no_candidate, jnp.zeros((b,), jnp.int32))
    init = (ones, scores_of(full.acts), best0, jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32), jnp.int32(0))
    _, _, (mask, logits, _, kept), _, _, _ = jax.lax.while_loop(cond, body, init)
    loss, _ = loss_of(logits, mask)
    return Route(cdrp=mask, loss=loss, fell_back=kept == 0, iterations=kept, pred=pred,
                 gated_pred=jnp.argmax(logits, -1), gated_logits=logits, full_logits=full.logits)
