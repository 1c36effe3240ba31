"""A small CNN for scikit-learn's 8x8 digits (the embedded default data set)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from jaxroute.models.base import GatedModule, batch_norm, conv, finish, forward_start, gated_relu


class DigitsCNN(GatedModule):
    """conv32-conv64-maxpool-conv128 (3x3, BN, ReLU), global average pool, linear.

    Gate points ``conv1``, ``conv2``, ``conv3``: after BN+ReLU (``post_act``)
    or on the raw conv output (``conv``).
    """

    num_classes: int = 10
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        gp, h = forward_start(self, x, gates, 1, "digits_cnn")
        for k, f in enumerate((32, 64, 128), start=1):
            h = conv(f, 3, 1, 1, name=f"conv{k}")(h)
            h = gated_relu(gp, f"conv{k}", h, batch_norm(train, f"bn{k}"))
            if k == 2:
                h = nn.max_pool(h, (2, 2), (2, 2))
        feats = h.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="linear")(feats)
        return finish(gp, logits, feats, capture)
