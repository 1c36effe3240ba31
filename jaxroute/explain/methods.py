"""Saliency methods, batched, with full weights or under any gates (e.g. a class's subnetwork).

Every method has one signature::

    ex = method(model, gates, x, target, *, config=None, key=None)   # -> Explanation
    ex.attributions   # (B, H, W, C) float, with respect to the [0, 1] pixel input
    ex.maps           # (B, H, W) the 2-D saliency map

``model`` is a :class:`~jaxroute.models.GatedModel`; ``gates`` anything its
``logits`` take (None, a gate tree, a flat CDRP ``(D,)`` or per-sample
``(B, D)``, or a gate function), so each image of a batch can be explained
under its own class's subnetwork in one call (``gates = subnets[target]``);
``x`` pixel-space images (B, H, W, C) in [0, 1]; ``target`` (B,) int the class
whose logit is explained (the paper is silent on the output explained; we use
the pre-softmax logit, as Captum does given ``target``).  ``config`` is the
method's frozen config (None: the defaults), ``key`` a PRNG key (SmoothGrad
only).  All are pure and jittable (``model``, ``config`` static); samples are
independent, so the summed target logit's input gradient is every sample's
own gradient in one backward pass.

The 2-D map of every pixel-space method is ``max_c |attribution|`` (Simonyan
et al. 2014, Sec. 3.1; the paper is silent).  Grad-CAM's map is its
(upsampled) class activation map; its ``attributions`` are that map repeated
over the input channels, since Grad-CAM attributes to a layer, not to pixels.

Methods (``METHODS`` by name):

* ``gradient`` -- d logit_t / d x (Simonyan et al. 2014).
* ``deconvnet`` -- the same backward pass with every ReLU passing
  ``max(g, 0)`` regardless of its forward input (Zeiler & Fergus 2014).
* ``guided_backprop`` -- every ReLU passing ``max(g, 0) * (x > 0)``
  (Springenberg et al. 2015).  Both rules apply to *every* ReLU of the model,
  the ones after residual additions included
  (:meth:`~jaxroute.models.GatedModel.with_relu_rule`); they are Captum's
  ``Deconvolution``/``GuidedBackprop`` rules.
* ``grad_cam`` -- Selvaraju et al. 2017: at layer A (default: the last
  spatial gate point, i.e. the last block's output under the ``post_act``
  or ``block`` placement), ``ReLU(sum_c mean_hw(d logit_t / dA)_c * A_c)``,
  upsampled bilinearly (half-pixel centres, as PyTorch's ``interpolate``
  with ``align_corners=False``) to the input size.
* ``integrated_gradients`` -- Sundararajan et al. 2017:
  ``(x - x') * integral_0^1 grad(x' + a (x - x')) da`` from a black
  baseline ``x' = 0``, the integral by 50-point Gauss-Legendre quadrature on
  [0, 1] (Captum's default; the paper uses a Riemann sum of 20-300 steps).
* ``smoothgrad`` -- Smilkov et al. 2017: the mean gradient over 50 noisy
  copies ``x + N(0, sigma^2)``, sigma = 0.15 of the input range (the paper's
  10-20 %), noisy images not clipped (as in the paper and Captum).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.models.gates import check_gates
from jaxroute.utils.checks import check_finite, check_int
from jaxroute.utils.conv_grads import loop_friendly
from jaxroute.utils.registry import registry_config


class Explanation(NamedTuple):
    attributions: jax.Array  # (B, H, W, C) with respect to the pixel input
    maps: jax.Array          # (B, H, W)


def saliency_map(attributions: jax.Array) -> jax.Array:
    """The 2-D map of pixel attributions (B, H, W, C): ``max_c |a|``."""
    return jnp.max(jnp.abs(attributions), axis=-1)


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class GradientConfig:
    """No hyper-parameters: ``gradient``, ``deconvnet`` and ``guided_backprop`` differ only in the ReLU rule."""


@dataclasses.dataclass(frozen=True)
class GradCAMConfig:
    """``layer``: the gate point whose activation is explained (None: the last spatial one);
    ``relu``: rectify the map (Selvaraju et al.); ``upsample``: ``"bilinear"`` to the input
    size, or ``"none"`` to keep the layer's resolution (then ``maps`` is (B, h, w) and
    ``attributions`` (B, h, w, 1))."""

    layer: str | None = None
    relu: bool = True
    upsample: str = "bilinear"

    def __post_init__(self):
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ValueError(f"Grad-CAM layer must be a gate point name or None, got {self.layer!r}")
        if not isinstance(self.relu, bool):
            raise ValueError(f"Grad-CAM relu must be True or False, got {self.relu!r}")
        if self.upsample not in ("bilinear", "none"):
            raise ValueError(f"Grad-CAM upsample must be 'bilinear' or 'none', got {self.upsample!r}")


@dataclasses.dataclass(frozen=True)
class IGConfig:
    """Integrated gradients: ``steps`` quadrature points (``rule`` ``"gausslegendre"``, Captum's
    default, or ``"riemann_trapezoid"``), from a constant ``baseline`` image (0.0: black);
    ``batch_steps`` quadrature points evaluated at once (fewer bound memory; None: the backend's
    choice, see :func:`points_at_once`)."""

    steps: int = 50
    rule: str = "gausslegendre"
    baseline: float = 0.0
    batch_steps: int | None = None

    def __post_init__(self):
        check_int(self.steps, "IG steps", 1 if self.rule == "gausslegendre" else 2)
        if self.rule not in ("gausslegendre", "riemann_trapezoid"):
            raise ValueError(f"IG rule must be 'gausslegendre' or 'riemann_trapezoid', got {self.rule!r}")
        check_finite(self.baseline, "IG baseline")
        if self.batch_steps is not None:
            check_int(self.batch_steps, "IG batch_steps", 1)

    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Quadrature points ``a`` in [0, 1] and weights (Captum's ``approximation_parameters``)."""
        if self.rule == "gausslegendre":
            x, w = np.polynomial.legendre.leggauss(self.steps)
            return 0.5 * (1 + x), 0.5 * w
        a = np.linspace(0, 1, self.steps)
        w = np.full(self.steps, 1.0 / (self.steps - 1))
        w[[0, -1]] *= 0.5
        return a, w


@dataclasses.dataclass(frozen=True)
class SmoothGradConfig:
    """SmoothGrad: ``samples`` noisy copies, noise std ``sigma * value_range`` (the pixel range
    is 1.0); ``batch_samples`` copies evaluated at once (None: the backend's choice, see
    :func:`points_at_once`)."""

    samples: int = 50
    sigma: float = 0.15
    value_range: float = 1.0
    batch_samples: int | None = None

    def __post_init__(self):
        check_int(self.samples, "SmoothGrad samples", 1)
        for name in ("sigma", "value_range"):
            check_finite(getattr(self, name), f"SmoothGrad {name}")
            if getattr(self, name) < 0:
                raise ValueError(f"SmoothGrad {name} must be >= 0, got {getattr(self, name)}")
        if self.batch_samples is not None:
            check_int(self.batch_samples, "SmoothGrad batch_samples", 1)

    @property
    def std(self) -> float:
        return self.sigma * self.value_range


# ----------------------------------------------------------------------------- helpers
def _check_target(model, x, target) -> jax.Array:
    target = jnp.asarray(target)
    if target.shape != (x.shape[0],) or not jnp.issubdtype(target.dtype, jnp.integer):
        raise ValueError(f"target must be an integer array of shape ({x.shape[0]},), got "
                         f"{target.dtype}{tuple(target.shape)}")
    return target


def target_logit_grad(model, gates, x: jax.Array, target: jax.Array) -> jax.Array:
    """d logit_target / d x for every sample (B, H, W, C), through the model's own ReLU rule."""
    target = _check_target(model, x, target)
    # XLA:CPU's fast convolution gradients (see jaxroute.utils.conv_grads): the steps of IG and
    # SmoothGrad may run in a loop (batch_steps / batch_samples), where plain jax.grad is slow
    logits_fn = loop_friendly(lambda x: model.logits(x, gates))

    def total(x):
        return jnp.take_along_axis(logits_fn(x), target[:, None], axis=1).sum()

    return jax.grad(total)(x)


def points_at_once(batch: int | None, n: int) -> int:
    """How many of IG's ``n`` quadrature points (SmoothGrad's noisy copies) run at once: ``batch``,
    or for None all ``n`` on accelerators and one at a time on the CPU backend.

    Why one on CPU: XLA:CPU's convolutions run a (points x images) batch at a
    lower rate per image than the image batch alone, and a loop over the points
    with the loop-friendly convolution gradients (:mod:`jaxroute.utils.conv_grads`)
    runs each point at the image batch's own rate (``python -m benchmarks.explain``
    compares IG and SmoothGrad with Captum's, which expand the batch).
    """
    if batch is not None:
        return min(batch, n)
    return 1 if jax.default_backend() == "cpu" else n


def _over_points(fn: Callable, points: jax.Array, batch: int | None) -> jax.Array:
    """``stack([fn(p) for p in points])``: all points vmapped at once, or ``batch`` at a time
    (:func:`points_at_once`)."""
    batch = points_at_once(batch, points.shape[0])
    if batch >= points.shape[0]:
        return jax.vmap(fn)(points)
    return jax.lax.map(fn, points, batch_size=batch)


def _relu_rule_method(rule: str):
    def method(model, gates, x, target, *, config=None, key=None) -> Explanation:
        attr = target_logit_grad(model.with_relu_rule(rule), gates, x, target)
        return Explanation(attr, saliency_map(attr))

    return method


gradient = _relu_rule_method("plain")
gradient.__name__ = "gradient"
gradient.__doc__ = "Vanilla gradient (Simonyan et al. 2014): d logit_target / d x."
deconvnet = _relu_rule_method("deconvnet")
deconvnet.__name__ = "deconvnet"
deconvnet.__doc__ = "Deconvnet (Zeiler & Fergus 2014): every ReLU passes max(g, 0) backwards."
guided_backprop = _relu_rule_method("guided")
guided_backprop.__name__ = "guided_backprop"
guided_backprop.__doc__ = "Guided backpropagation (Springenberg et al. 2015): every ReLU passes max(g, 0) * (x > 0)."


def integrated_gradients(model, gates, x, target, *, config: IGConfig | None = None, key=None) -> Explanation:
    """Integrated gradients from a constant baseline (see the module docstring)."""
    config = config or IGConfig()
    alphas, weights = (jnp.asarray(v, x.dtype) for v in config.nodes())
    base = jnp.full_like(x, config.baseline)

    def grad_at(a):
        return target_logit_grad(model, gates, base + a * (x - base), target)

    grads = _over_points(grad_at, alphas, config.batch_steps)          # (S, B, H, W, C)
    attr = (x - base) * jnp.tensordot(weights, grads, axes=1)
    return Explanation(attr, saliency_map(attr))


def smoothgrad_noise(key: jax.Array, x: jax.Array, config: SmoothGradConfig | None = None) -> jax.Array:
    """The noise SmoothGrad adds, (B, samples, H, W, C): sample b draws from ``key[b]`` when ``key``
    holds one key per sample (results then do not depend on the batch an image is in), else every
    sample from its own split of the one ``key``."""
    config = config or SmoothGradConfig()
    key = jnp.asarray(key)
    keys = key if key.shape == (x.shape[0],) else jax.random.split(key, x.shape[0])
    if keys.shape != (x.shape[0],):
        raise ValueError(f"SmoothGrad needs one PRNG key or one per sample ({x.shape[0]},), got shape {key.shape}")
    draw = jax.vmap(lambda k: jax.random.normal(k, (config.samples, *x.shape[1:]), x.dtype))
    return draw(keys) * config.std


def smoothgrad(model, gates, x, target, *, config: SmoothGradConfig | None = None, key=None,
               noise: jax.Array | None = None) -> Explanation:
    """SmoothGrad (see the module docstring).  ``key``: one PRNG key, or one per sample;
    ``noise`` (B, samples, H, W, C) replaces the drawn noise (for comparisons)."""
    config = config or SmoothGradConfig()
    if noise is None:
        if key is None:
            raise ValueError("smoothgrad needs an explicit PRNG key (key=jax.random.key(...))")
        noise = smoothgrad_noise(key, x, config)
    expected = (x.shape[0], config.samples, *x.shape[1:])
    if tuple(noise.shape) != expected:
        raise ValueError(f"SmoothGrad noise must have shape {expected}, got {tuple(noise.shape)}")
    grads = _over_points(lambda n: target_logit_grad(model, gates, x + n, target),
                         jnp.swapaxes(noise, 0, 1), config.batch_samples)  # (S, B, H, W, C)
    attr = grads.mean(axis=0)
    return Explanation(attr, saliency_map(attr))


def grad_cam_layer(model, config: GradCAMConfig | None = None) -> str:
    """The gate point Grad-CAM explains: the config's, or the model's last spatial one."""
    config = config or GradCAMConfig()
    acts = jax.eval_shape(lambda x: model.capture(x).acts,
                          jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32))
    spatial = [n for n in model.spec.names if len(acts[n].shape) == 4]
    if config.layer is None:
        if not spatial:
            raise ValueError(f"{model.name} has no spatial gate point for Grad-CAM")
        return spatial[-1]
    if config.layer not in spatial:
        raise ValueError(f"Grad-CAM layer {config.layer!r} is not a spatial gate point of {model.name}; "
                         f"one of {spatial}")
    return config.layer


def grad_cam_map(model, gates, x, target, *, layer: str, relu: bool = True) -> jax.Array:
    """The class activation map at gate point ``layer``, (B, h, w), before upsampling."""
    target = _check_target(model, x, target)
    tree = model.gate_tree(gates)
    if isinstance(tree, Mapping):
        check_gates(model.spec, tree, x.shape[0])
    shape = jax.eval_shape(lambda x: model.capture(x).acts[layer], jax.ShapeDtypeStruct(x.shape, x.dtype)).shape

    def run(shift):
        def gate_fn(name, a):
            g = tree(name, a) if callable(tree) else (None if tree is None else tree.get(name))
            return g, (shift if name == layer else None)

        cap = model.capture(x, gate_fn)
        return jnp.take_along_axis(cap.logits, target[:, None], axis=1).sum(), cap.acts[layer]

    grads, acts = jax.grad(run, has_aux=True)(jnp.zeros(shape, x.dtype))
    weights = grads.mean(axis=(1, 2), keepdims=True)           # alpha_c = mean_hw d logit / dA
    cam = jnp.sum(weights * acts, axis=-1)
    return jax.nn.relu(cam) if relu else cam


def grad_cam(model, gates, x, target, *, config: GradCAMConfig | None = None, key=None) -> Explanation:
    """Grad-CAM (see the module docstring)."""
    config = config or GradCAMConfig()
    cam = grad_cam_map(model, gates, x, target, layer=grad_cam_layer(model, config), relu=config.relu)
    if config.upsample == "bilinear":
        cam = jax.image.resize(cam, (x.shape[0], *x.shape[1:3]), "bilinear")
        return Explanation(jnp.broadcast_to(cam[..., None], x.shape), cam)
    return Explanation(cam[..., None], cam)


# name -> (method, its config class)
METHODS: dict[str, tuple[Callable, type]] = {
    "gradient": (gradient, GradientConfig),
    "deconvnet": (deconvnet, GradientConfig),
    "guided_backprop": (guided_backprop, GradientConfig),
    "grad_cam": (grad_cam, GradCAMConfig),
    "integrated_gradients": (integrated_gradients, IGConfig),
    "smoothgrad": (smoothgrad, SmoothGradConfig),
}
NEEDS_KEY = ("smoothgrad",)


def method_config(method: str, config=None):
    """The config of ``method``: ``config`` itself (checked), or the defaults."""
    return registry_config(METHODS, method, config, "saliency method")


def explain(model, gates, x, target, *, method: str, config=None, key=None) -> Explanation:
    """Run saliency method ``method`` by name (same arguments as the methods)."""
    config = method_config(method, config)
    if method in NEEDS_KEY and key is None:
        raise ValueError(f"{method} needs an explicit PRNG key (key=jax.random.key(...))")
    return METHODS[method][0](model, gates, x, target, config=config, key=key)
