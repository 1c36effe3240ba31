"""ImageNet ResNet-18/50 in the torchvision layout (v1.5: stride on the 3x3 conv).

Flax module names mirror torchvision's state-dict names
(``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``).

Gate points: ``post_act`` gates ``conv1`` (stem, after BN+ReLU, before the
max-pool), every inner ``layerS.B.convK`` after its BN+ReLU, and ``layerS.B``
after the residual ReLU.  ``conv`` gates every main-path conv output before
its BN (``layerS.B.conv1..3``); the 1x1 projection shortcuts are not gated.
"""
from __future__ import annotations

import flax.linen as nn

from jaxroute.models.base import BLOCK_PLACEMENT, GATE_PLACEMENTS, GatedModule, GatePoints, batch_norm, conv, finish, forward_start, gated_relu


class _Block(nn.Module):
    planes: int
    stride: int
    bottleneck: bool

    @nn.compact
    def __call__(self, x, gp: GatePoints, prefix: str, train: bool):
        if self.bottleneck:
            convs = [(self.planes, 1, 1, 0), (self.planes, 3, self.stride, 1), (self.planes * 4, 1, 1, 0)]
        else:
            convs = [(self.planes, 3, self.stride, 1), (self.planes, 3, 1, 1)]
        out = x
        for k, (feat, ksz, st, pad) in enumerate(convs, start=1):
            out = conv(feat, ksz, st, pad, name=f"conv{k}")(out)
            if k < len(convs):
                out = gated_relu(gp, f"{prefix}.conv{k}", out, batch_norm(train, f"bn{k}"))
            else:  # the last conv's output joins the residual sum before its ReLU
                out = batch_norm(train, f"bn{k}")(gp.site("conv", f"{prefix}.conv{k}", out))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out.shape[-1]:
            shortcut = conv(out.shape[-1], 1, self.stride, 0, name="downsample_0")(x)
            shortcut = batch_norm(train, "downsample_1")(shortcut)
        return gp.site("block", prefix, gp.relu(out + shortcut))


class ImageNetResNet(GatedModule):
    depth: int = 18

    placements = GATE_PLACEMENTS + (BLOCK_PLACEMENT,)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        layouts = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}
        if self.depth not in layouts:
            raise ValueError(f"ImageNet ResNet depth must be one of {sorted(layouts)}, got {self.depth}")
        blocks, bottleneck = layouts[self.depth]
        gp, h = forward_start(self, x, gates, 3, f"resnet{self.depth}")
        h = conv(64, 7, 2, 3, name="conv1")(h)
        h = gated_relu(gp, "conv1", h, batch_norm(train, "bn1"))
        h = nn.max_pool(h, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for s, (planes, nb) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            for b in range(nb):
                stride = 2 if (s > 1 and b == 0) else 1
                h = _Block(planes, stride, bottleneck, name=f"layer{s}_{b}")(
                    h, gp, f"layer{s}.{b}", train
                )
        feats = h.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="fc")(feats)
        return finish(gp, logits, feats, capture)
