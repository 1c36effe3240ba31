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

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxroute.models.gates import apply_gate

GATE_PLACEMENTS = ("post_act", "conv")


class GatePoints:
    """Applies gates at named points during one forward pass and records them.

    It collects every problem with the gate tree (unknown names, missing
    names, wrong channel counts) and raises one error listing all of them at
    the end of the forward pass -- shapes are static, so this happens once at
    trace time and costs nothing inside ``jit``.
    """

    def __init__(self, gates: Mapping | None, batch: int):
        if gates is not None and not isinstance(gates, Mapping):
            raise TypeError(
                f"gates must be a dict {{gate_point: array}} or None, got {type(gates).__name__}"
            )
        self.gates = gates
        self.batch = batch
        self.acts: dict[str, jax.Array] = {}
        self.problems: list[str] = []

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        g = None
        if self.gates is not None:
            if name not in self.gates:
                self.problems.append(f"missing gate point {name!r} ({c} channels)")
            else:
                g = self.gates[name]
                shape = tuple(jnp.shape(g))
                if shape != (c,) and shape != (self.batch, c):
                    self.problems.append(
                        f"{name!r}: got shape {shape}, expected ({c},) or ({self.batch}, {c})"
                    )
                    g = None
        x = apply_gate(x, g)
        self.acts[name] = x
        return x

    def finish(self) -> dict[str, jax.Array]:
        if self.gates is not None:
            extra = [k for k in self.gates if k not in self.acts]
            if extra:
                self.problems.append(f"unexpected gate points {extra}")
        if self.problems:
            raise ValueError(
                "gate tree does not match the model:\n  "
                + "\n  ".join(self.problems)
                + f"\n  the model's gate points, in forward order: "
                + str([(k, v.shape[-1]) for k, v in self.acts.items()])
            )
        return self.acts


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
        return logits, {"gates": acts, "features": feats}
    return logits


def check_placement(p: str) -> None:
    if p not in GATE_PLACEMENTS:
        raise ValueError(f"gate_placement must be one of {GATE_PLACEMENTS}, got {p!r}")
