"""Shared pieces of the gate-aware models.

Every model is a Flax ``nn.Module`` called as::

    logits = model.apply(variables, x, gates=None)                # (B, classes)
    logits, cap = model.apply(variables, x, gates=g, capture=True)
    # cap["gates"]: {gate_point: activation after its gate}, forward order
    # cap["features"]: penultimate features (input of the last linear layer)

``x`` is a batch of images in *pixel space*, NHWC float in [0, 1]; each
model normalizes with its own ``mean``/``std`` (the model's metadata), so
callers, attacks and routing never handle normalization themselves.
"""
from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxroute.models.gates import GateSpec, apply_gate, check_gates, gate_shape_problem

GATE_PLACEMENTS = ("post_act", "conv")   # every model has these
RELU_RULES = ("plain", "deconvnet", "guided")  # backward rules of every ReLU (see relu_with_rule)
BLOCK_PLACEMENT = "block"                  # residual networks also gate only their block outputs
DECOUPLE_PLACEMENT = "decouple"            # trained per-layer controllers (jaxroute.decoupling)
# which sites of the forward pass each placement gates (see GatePoints.site)
PLACEMENT_SITES = {"post_act": ("act", "block"), "conv": ("conv",), "block": ("block",),
                   "decouple": ("decouple",)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GatedModule(nn.Module):
    """The fields every gate-aware model has (``create_model`` sets them from the model card).

    Subclasses implement ``__call__(x, gates=None, train=False, capture=False)``,
    starting with :func:`forward_start` and ending with :func:`finish`.
    """

    num_classes: int = 1000
    gate_placement: str = "post_act"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    relu_rule: str = "plain"  # the backward rule of every ReLU: one of RELU_RULES

    placements: ClassVar[tuple[str, ...]] = GATE_PLACEMENTS  # the placements this architecture offers


class GatePoints:
    """Applies gates at named points during one forward pass and records the activations.

    ``gates`` is None, a gate tree (checked as a whole by
    :func:`~jaxroute.models.gates.check_gates` when the pass ends, so one error
    lists every problem) or a function ``(point_name, activation) -> gate``
    (each returned gate's shape is checked as it is applied).  A gate
    function may also return a pair ``(gate, shift)``: ``shift``, shaped like
    the activation, is added after the gate, so that gradients with respect
    to an intermediate activation (Grad-CAM) are gradients with respect to
    ``shift`` at zero.  Shapes are
    static, so the checks run once at trace time and cost nothing inside ``jit``.
    """

    def __init__(self, gates, batch: int, placement: str = "post_act", relu_rule: str = "plain"):
        if gates is not None and not isinstance(gates, Mapping) and not callable(gates):
            raise TypeError("gates must be a dict {gate_point: array}, a function (point_name, activation) "
                            f"-> gate, or None; got {type(gates).__name__}")
        self.gates = gates
        self.batch = batch
        self.sites = PLACEMENT_SITES[placement]
        self.relu_rule = relu_rule
        self.acts: dict[str, jax.Array] = {}
        self.problems: list[str] = []
        self.extra: dict[str, dict] = {}  # per gate point: what a controller computed there

    def __call__(self, name: str, x: jax.Array, default: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        g = None
        shift = None
        if isinstance(self.gates, Mapping):
            g = self.gates.get(name)
            if g is not None and gate_shape_problem(name, jnp.shape(g), c, self.batch):
                g = None  # reported by check_gates in finish()
        elif self.gates is not None:
            g = self.gates(name, x)
            gated = True
            if isinstance(g, tuple):  # (gate or None, shift)
                g, shift = g
                gated = g is not None
                if shift is not None and jnp.shape(shift) != x.shape:
                    self.problems.append(f"{name!r}: shift of shape {jnp.shape(shift)}, expected {x.shape}")
                    shift = None
            problem = gated and gate_shape_problem(name, jnp.shape(g), c, self.batch)
            if problem:
                self.problems.append(problem)
                g = None
        else:
            g = default  # the model's own gate (a controller's z), used when the caller gives none
        x = apply_gate(x, g)
        if shift is not None:
            x = x + shift
        self.acts[name] = x
        return x

    def relu(self, x: jax.Array) -> jax.Array:
        """The model's ReLU, with the backward rule the model was built with (:func:`relu_with_rule`)."""
        return relu_with_rule(x, self.relu_rule)

    def site(self, kind: str, name: str, x: jax.Array, default: jax.Array | None = None) -> jax.Array:
        """A place in the forward pass where a gate may sit: ``kind`` is ``"conv"`` (a raw conv or
        linear output), ``"act"`` (after a layer's activation), ``"block"`` (a residual block's
        output after its ReLU) or ``"decouple"`` (a controlled conv's output, ``default`` being the
        controller's gate).  The model's placement decides which kinds are gate points."""
        return self(name, x, default) if kind in self.sites else x

    def spec(self) -> GateSpec:
        return GateSpec(tuple(self.acts), tuple(int(v.shape[-1]) for v in self.acts.values()))

    def finish(self) -> dict[str, jax.Array]:
        spec = self.spec()
        if isinstance(self.gates, Mapping):
            check_gates(spec, self.gates, self.batch)
        if self.problems:
            raise ValueError("the gate function returned gates that do not fit:\n  " + "\n  ".join(self.problems)
                             + f"\n  the model's gate points, in forward order: {list(spec)}")
        return self.acts


def forward_start(module, x: jax.Array, gates, channels: int, name: str):
    """The common start of every model's forward pass.

    Checks the gate placement and the input, and returns the gate points and
    the normalized input: ``gp, h = forward_start(self, x, gates, 3, "resnet20")``.
    """
    check_placement(module.gate_placement, module.placements, type(module).__name__)
    check_input(x, channels, name)
    if module.relu_rule not in RELU_RULES:
        raise ValueError(f"relu_rule must be one of {RELU_RULES}, got {module.relu_rule!r}")
    gp = GatePoints(gates, x.shape[0], module.gate_placement, module.relu_rule)
    return gp, normalize(x, module.mean, module.std)


def gated_relu(gp: GatePoints, name: str, h: jax.Array, bn=None) -> jax.Array:
    """A layer's (BN and) ReLU with gate point ``name`` around it: on the raw layer output
    (``conv`` placement) or after the ReLU (``post_act``)."""
    h = gp.site("conv", name, h)
    if bn is not None:
        h = bn(h)
    return gp.site("act", name, gp.relu(h))


@jax.custom_vjp
def _deconvnet_relu(x):
    return jnp.maximum(x, 0)


def _deconvnet_fwd(x):
    return jnp.maximum(x, 0), None


def _deconvnet_bwd(_, g):
    # Zeiler & Fergus 2014: the backward pass rectifies the incoming signal and ignores the forward input.
    return (jnp.maximum(g, 0),)


_deconvnet_relu.defvjp(_deconvnet_fwd, _deconvnet_bwd)


@jax.custom_vjp
def _guided_relu(x):
    return jnp.maximum(x, 0)


def _guided_fwd(x):
    return jnp.maximum(x, 0), x > 0


def _guided_bwd(positive, g):
    # Springenberg et al. 2015: pass a gradient only where the forward input and the gradient are positive.
    return (jnp.where(positive & (g > 0), g, jnp.zeros_like(g)),)


_guided_relu.defvjp(_guided_fwd, _guided_bwd)


def relu_with_rule(x: jax.Array, rule: str = "plain") -> jax.Array:
    """ReLU whose forward is always max(x, 0) and whose backward pass follows ``rule``:

    * ``"plain"``: the true gradient, ``g * (x > 0)`` (``nn.relu``);
    * ``"deconvnet"``: ``max(g, 0)`` (Zeiler & Fergus 2014);
    * ``"guided"``: ``max(g, 0) * (x > 0)`` (guided backpropagation, Springenberg et al. 2015).

    These are Captum's rules for ``Deconvolution`` and ``GuidedBackprop``;
    here they apply to every ReLU of the network (residual ones included).
    """
    if rule == "plain":
        return nn.relu(x)
    if rule == "deconvnet":
        return _deconvnet_relu(x)
    if rule == "guided":
        return _guided_relu(x)
    raise ValueError(f"relu_rule must be one of {RELU_RULES}, got {rule!r}")


def check_input(x: jax.Array, channels: int, name: str) -> None:
    """Clear error for a wrongly shaped or typed image batch (static check)."""
    if not hasattr(x, "shape") or x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{name} expects images of shape (B, H, W, {channels}) in NHWC pixel space [0, 1], "
            f"got shape {getattr(x, 'shape', type(x).__name__)}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} expects floating-point images in [0, 1], got dtype {x.dtype} "
            "(convert uint8 images with x.astype('float32') / 255)"
        )


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    mean = jnp.asarray(mean, x.dtype)
    std = jnp.asarray(std, x.dtype)
    return (x - mean) / std


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    # PyTorch defaults: momentum 0.1 (Flax counts the other way: 0.9), eps 1e-5.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False, name=None):
    # Explicit symmetric padding: XLA's "SAME" pads (0, 1) for even inputs at
    # stride 2, PyTorch pads (1, 1); only explicit padding matches converted weights.
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=bias,
        name=name,
    )


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d`` on NHWC input (bins floor(i*H/o)..ceil((i+1)*H/o))."""
    h, w = x.shape[1], x.shape[2]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return x
    rows = []
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cols = []
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            cols.append(x[:, h0:h1, w0:w1, :].mean(axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flatten NHWC as PyTorch flattens NCHW, so converted Linear weights fit as-is."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def flax_path(dotted: str) -> tuple[str, ...]:
    """Flax module path of a PyTorch-style dotted name: numeric parts join their
    parent (``layer1.0.conv1`` -> ``("layer1_0", "conv1")``, ``features.0`` ->
    ``("features_0",)``).  Gate points and converted tensors share this rule."""
    parts: list[str] = []
    for p in dotted.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


def finish(gp: GatePoints, logits: jax.Array, feats: jax.Array, capture: bool):
    """The common end of every model's forward pass: check the gate tree, return."""
    acts = gp.finish()
    if capture:
        cap = {"gates": acts, "features": feats}
        if gp.extra:  # controller outputs (decouple placement), read by jaxroute.decoupling
            cap["decouple"] = gp.extra
        return logits, cap
    return logits


def check_placement(p: str, allowed: tuple[str, ...] = GATE_PLACEMENTS, model: str = "this model") -> None:
    if p not in allowed:
        raise ValueError(f"gate_placement must be one of {allowed} for {model}, got {p!r}")
