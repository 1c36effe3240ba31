"""A small CNN for scikit-learn's 8x8 digits (the embedded default data set)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from jaxroute.models.base import GatePoints, finish, batch_norm, check_input, check_placement, conv, normalize


class DigitsCNN(nn.Module):
    """conv32-conv64-maxpool-conv128 (3x3, BN, ReLU), global average pool, linear.

    Gate points ``conv1``, ``conv2``, ``conv3``: after BN+ReLU (``post_act``)
    or on the raw conv output (``conv``).
    """

    num_classes: int = 10
    gate_placement: str = "post_act"
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        check_placement(self.gate_placement)
        check_input(x, 1, "digits_cnn")
        gp = GatePoints(gates, x.shape[0])
        post = self.gate_placement == "post_act"
        h = normalize(x, self.mean, self.std)
        for k, f in enumerate((32, 64, 128), start=1):
            h = conv(f, 3, 1, 1, name=f"conv{k}")(h)
            if not post:
                h = gp(f"conv{k}", h)
            h = nn.relu(batch_norm(train, f"bn{k}")(h))
            if post:
                h = gp(f"conv{k}", h)
            if k == 2:
                h = nn.max_pool(h, (2, 2), (2, 2))
        feats = h.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="linear")(feats)
        return finish(gp, logits, feats, capture)
