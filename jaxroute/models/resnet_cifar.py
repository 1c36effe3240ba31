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
* ``gate_placement="decouple"``: network decoupling (:mod:`jaxroute.decoupling`):
  controllers ``layerS_B/controller1`` and ``controller2`` (new parameters; the
  backbone's names are unchanged) gate ``layerS.B.conv1`` after the block's
  first BN+ReLU (reading the block input) and ``layerS.B.conv2`` on bn2's output
  before the residual addition (reading the gated conv1 output).
"""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from jaxroute.decoupling.controller import Controller, controlled
from jaxroute.models.base import (BLOCK_PLACEMENT, DECOUPLE_PLACEMENT, GATE_PLACEMENTS, GatedModule, GatePoints,
                                  batch_norm, conv, finish, forward_start, gated_relu)



class BasicBlockA(nn.Module):
    planes: int
    stride: int
    controllers: dict | None = None  # Controller fields when decoupled, else None

    @nn.compact
    def __call__(self, x, gp: GatePoints, prefix: str, train: bool):
        ctrl = self.controllers
        out = conv(self.planes, 3, self.stride, 1, name="conv1")(x)
        out = gated_relu(gp, f"{prefix}.conv1", out, batch_norm(train, "bn1"))
        out = controlled(gp, ctrl and Controller(self.planes, **ctrl, name="controller1"), f"{prefix}.conv1", x, out)
        h1 = out
        out = conv(self.planes, 3, 1, 1, name="conv2")(out)
        out = gp.site("conv", f"{prefix}.conv2", out)
        out = batch_norm(train, "bn2")(out)
        out = controlled(gp, ctrl and Controller(self.planes, **ctrl, name="controller2"), f"{prefix}.conv2", h1, out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            # Option A: subsample rows/cols from index 0, zero-pad channels on both sides.
            p = self.planes // 4
            shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (p, p)))
        return gp.site("block", prefix, gp.relu(out + shortcut))


class CifarResNet(GatedModule):
    depth: int = 20
    num_classes: int = 10
    controller_reduction: int = 4   # γ of the decouple placement's controllers
    semhash: str = "half"           # SemHash mode of the decouple placement ("half" | "official")

    placements = GATE_PLACEMENTS + (BLOCK_PLACEMENT, DECOUPLE_PLACEMENT)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6N+2, got {self.depth}")
        n = (self.depth - 2) // 6
        gp, h = forward_start(self, x, gates, 3, f"resnet{self.depth}")
        ctrl = None
        if self.gate_placement == DECOUPLE_PLACEMENT:
            ctrl = {"num_classes": self.num_classes, "reduction": self.controller_reduction, "mode": self.semhash}
        h = conv(16, 3, 1, 1, name="conv1")(h)
        h = gated_relu(gp, "conv1", h, batch_norm(train, "bn1"))
        for s, planes in enumerate((16, 32, 64), start=1):
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                h = BasicBlockA(planes, stride, ctrl, name=f"layer{s}_{b}")(
                    h, gp, f"layer{s}.{b}", train
                )
        feats = h.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="linear")(feats)
        return finish(gp, logits, feats, capture)
