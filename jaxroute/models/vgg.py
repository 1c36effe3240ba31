"""VGG-16 (ImageNet, torchvision layout, no BN), CIFAR VGG-16 with BN, and AlexNet.

Module names mirror torchvision's ``features.N`` / ``classifier.N`` indices.
Gate points are named after the layer they follow: ``features.N`` for every
conv, ``classifier.N`` for every hidden fully connected layer (the final
classifier is not gated).  ``post_act`` gates after (BN+)ReLU; ``conv`` gates
the raw conv/linear output (for the BN-free nets the two agree, since
relu(g*z) = g*relu(z) for g >= 0).  Dropout is an identity at inference and
is omitted at training time too (the nets here are imported or fine-tuned).
"""
from __future__ import annotations

import flax.linen as nn

from jaxroute.models.base import (
    GatedModule, adaptive_avg_pool, batch_norm, conv, finish, flatten_chw, forward_start, gated_relu,
)

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(GatedModule):
    """VGG-16.  ``batch_norm=False, pool_to=7, hidden=4096``: torchvision ImageNet
    VGG-16; ``batch_norm=True, pool_to=None, hidden=512``: the CIFAR VGG-16-BN."""

    batch_norm: bool = False
    pool_to: int | None = 7
    hidden: int = 4096
    gate_fc: bool = False  # also gate the hidden fully connected layers (the paper's CDRP: conv channels only)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        gp, h = forward_start(self, x, gates, 3, "vgg16")
        i = 0
        for v in VGG16_CFG:
            if v == "M":
                h = nn.max_pool(h, (2, 2), (2, 2))
                i += 1
                continue
            h = conv(v, 3, 1, 1, bias=True, name=f"features_{i}")(h)
            bn = batch_norm(train, f"features_{i + 1}") if self.batch_norm else None
            h = gated_relu(gp, f"features.{i}", h, bn)
            i += 3 if self.batch_norm else 2
        if self.pool_to is not None:
            h = adaptive_avg_pool(h, (self.pool_to, self.pool_to))
        h = flatten_chw(h)
        for k in (0, 3):
            h = nn.Dense(self.hidden, name=f"classifier_{k}")(h)
            h = gated_relu(gp, f"classifier.{k}", h) if self.gate_fc else gp.relu(h)
        feats = h
        logits = nn.Dense(self.num_classes, name="classifier_6")(feats)
        return finish(gp, logits, feats, capture)


class AlexNet(GatedModule):
    """torchvision AlexNet (the single-tower variant of its model zoo)."""

    gate_fc: bool = False  # also gate the hidden fully connected layers (default: conv channels only)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        gp, h = forward_start(self, x, gates, 3, "alexnet")
        # (index, features, kernel, stride, padding, max-pool after)
        for i, f, k, s, p, pool in ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True),
                                    (6, 384, 3, 1, 1, False), (8, 256, 3, 1, 1, False),
                                    (10, 256, 3, 1, 1, True)):
            h = conv(f, k, s, p, bias=True, name=f"features_{i}")(h)
            h = gated_relu(gp, f"features.{i}", h)
            if pool:
                h = nn.max_pool(h, (3, 3), (2, 2))
        h = flatten_chw(adaptive_avg_pool(h, (6, 6)))
        for k in (1, 4):
            h = nn.Dense(4096, name=f"classifier_{k}")(h)
            h = gated_relu(gp, f"classifier.{k}", h) if self.gate_fc else gp.relu(h)
        feats = h
        logits = nn.Dense(self.num_classes, name="classifier_6")(feats)
        return finish(gp, logits, feats, capture)
