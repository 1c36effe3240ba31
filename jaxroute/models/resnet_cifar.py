"""CIFAR ResNet-20/32/44/56 (He et al. 2016, Sec. 4.2), option-A shortcuts.

The layout follows ``../shared/models/cifar10-resnet/README.md`` exactly
(the akamaster/pytorch_resnet_cifar10 checkpoints), with Flax module names
that mirror the PyTorch state-dict names (``layer1.0.conv1`` -> ``layer1_0/conv1``).

Gate points (forward order):

* ``gate_placement="post_act"`` (default): ``conv1`` after the stem's
  BN+ReLU; per block ``layerS.B.conv1`` after the block's first BN+ReLU and
  ``layerS.B`` after the residual addition and its ReLU.  A zero gate
  silences a channel, as the DGR paper defines critical nodes.
* ``gate_placement="conv"``: directly on each conv output, before BN, as the
  official DGR code does: ``conv1``, ``layerS.B.conv1``, ``layerS.B.conv2``.
  Note that a zero gate there does not silence the channel (BN adds its shift).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxroute.models.base import (
    GatePoints, finish, batch_norm, check_input, check_placement, conv, normalize,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlockA(nn.Module):
    planes: int
    stride: int
    placement: str

    @nn.compact
    def __call__(self, x, gp: GatePoints, prefix: str, train: bool):
        post = self.placement == "post_act"
        out = conv(self.planes, 3, self.stride, 1, name="conv1")(x)
        if not post:
            out = gp(f"{prefix}.conv1", out)
        out = nn.relu(batch_norm(train, "bn1")(out))
        if post:
            out = gp(f"{prefix}.conv1", out)
        out = conv(self.planes, 3, 1, 1, name="conv2")(out)
        if not post:
            out = gp(f"{prefix}.conv2", out)
        out = batch_norm(train, "bn2")(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            # Option A: subsample rows/cols from index 0, zero-pad channels on both sides.
            p = self.planes // 4
            shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (p, p)))
        out = nn.relu(out + shortcut)
        if post:
            out = gp(prefix, out)
        return out


class CifarResNet(nn.Module):
    depth: int = 20
    num_classes: int = 10
    gate_placement: str = "post_act"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        check_placement(self.gate_placement)
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6N+2, got {self.depth}")
        check_input(x, 3, f"resnet{self.depth}")
        n = (self.depth - 2) // 6
        gp = GatePoints(gates, x.shape[0])
        post = self.gate_placement == "post_act"
        h = normalize(x, self.mean, self.std)
        h = conv(16, 3, 1, 1, name="conv1")(h)
        if not post:
            h = gp("conv1", h)
        h = nn.relu(batch_norm(train, "bn1")(h))
        if post:
            h = gp("conv1", h)
        for s, planes in enumerate((16, 32, 64), start=1):
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                h = BasicBlockA(planes, stride, self.gate_placement, name=f"layer{s}_{b}")(
                    h, gp, f"layer{s}.{b}", train
                )
        feats = h.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="linear")(feats)
        return finish(gp, logits, feats, capture)
