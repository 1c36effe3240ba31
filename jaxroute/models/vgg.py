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

from typing import Sequence

import flax.linen as nn

from jaxroute.models.base import (
    GatePoints, finish, adaptive_avg_pool, batch_norm, check_input, check_placement, conv,
    flatten_chw, normalize,
)
from jaxroute.models.resnet_cifar import IMAGENET_MEAN, IMAGENET_STD

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _gated(gp, name, h, post, bn=None):
    if not post:
        h = gp(name, h)
    if bn is not None:
        h = bn(h)
    h = nn.relu(h)
    if post:
        h = gp(name, h)
    return h


class VGG16(nn.Module):
    """VGG-16.  ``batch_norm=False, pool_to=7, hidden=4096``: torchvision ImageNet
    VGG-16; ``batch_norm=True, pool_to=None, hidden=512``: the CIFAR VGG-16-BN."""

    num_classes: int = 1000
    batch_norm: bool = False
    pool_to: int | None = 7
    hidden: int = 4096
    gate_placement: str = "post_act"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        check_placement(self.gate_placement)
        check_input(x, 3, "vgg16")
        gp = GatePoints(gates, x.shape[0])
        post = self.gate_placement == "post_act"
        h = normalize(x, self.mean, self.std)
        i = 0
        for v in VGG16_CFG:
            if v == "M":
                h = nn.max_pool(h, (2, 2), (2, 2))
                i += 1
                continue
            h = conv(v, 3, 1, 1, bias=True, name=f"features_{i}")(h)
            bn = batch_norm(train, f"features_{i + 1}") if self.batch_norm else None
            h = _gated(gp, f"features.{i}", h, post, bn)
            i += 3 if self.batch_norm else 2
        if self.pool_to is not None:
            h = adaptive_avg_pool(h, (self.pool_to, self.pool_to))
        h = flatten_chw(h)
        for k in (0, 3):
            h = nn.Dense(self.hidden, name=f"classifier_{k}")(h)
            h = _gated(gp, f"classifier.{k}", h, post)
        feats = h
        logits = nn.Dense(self.num_classes, name="classifier_6")(feats)
        return finish(gp, logits, feats, capture)


class AlexNet(nn.Module):
    """torchvision AlexNet (the single-tower variant of its model zoo)."""

    num_classes: int = 1000
    gate_placement: str = "post_act"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        check_placement(self.gate_placement)
        check_input(x, 3, "alexnet")
        gp = GatePoints(gates, x.shape[0])
        post = self.gate_placement == "post_act"
        h = normalize(x, self.mean, self.std)
        # (index, features, kernel, stride, padding, max-pool after)
        for i, f, k, s, p, pool in ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True),
                                    (6, 384, 3, 1, 1, False), (8, 256, 3, 1, 1, False),
                                    (10, 256, 3, 1, 1, True)):
            h = conv(f, k, s, p, bias=True, name=f"features_{i}")(h)
            h = _gated(gp, f"features.{i}", h, post)
            if pool:
                h = nn.max_pool(h, (3, 3), (2, 2))
        h = flatten_chw(adaptive_avg_pool(h, (6, 6)))
        for k in (1, 4):
            h = nn.Dense(4096, name=f"classifier_{k}")(h)
            h = _gated(gp, f"classifier.{k}", h, post)
        feats = h
        logits = nn.Dense(self.num_classes, name="classifier_6")(feats)
        return finish(gp, logits, feats, capture)
