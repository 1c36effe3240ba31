"""A small CNN for scikit-learn's 8x8 digits (the embedded default data set)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from jaxroute.decoupling.controller import Controller, controlled
from jaxroute.models.base import (DECOUPLE_PLACEMENT, GATE_PLACEMENTS, GatedModule, batch_norm, conv, finish,
                                  forward_start, gated_relu)


class DigitsCNN(GatedModule):
    """conv32-conv64-maxpool-conv128 (3x3, BN, ReLU), global average pool, linear.

    Gate points ``conv1``, ``conv2``, ``conv3``: after BN+ReLU (``post_act``)
    or on the raw conv output (``conv``).  ``decouple``: controllers
    ``controller2``, ``controller3`` (reading each conv's input) gate ``conv2``
    and ``conv3`` after BN+ReLU; the first conv has none, as in the paper.
    """

    num_classes: int = 10
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    controller_reduction: int = 4   # γ of the decouple placement's controllers
    semhash: str = "half"           # SemHash mode of the decouple placement

    placements = GATE_PLACEMENTS + (DECOUPLE_PLACEMENT,)

    @nn.compact
    def __call__(self, x, gates=None, train: bool = False, capture: bool = False):
        gp, h = forward_start(self, x, gates, 1, "digits_cnn")
        decouple = self.gate_placement == DECOUPLE_PLACEMENT
        for k, f in enumerate((32, 64, 128), start=1):
            x_in = h
            h = conv(f, 3, 1, 1, name=f"conv{k}")(h)
            h = gated_relu(gp, f"conv{k}", h, batch_norm(train, f"bn{k}"))
            ctrl = None
            if decouple and k > 1:
                ctrl = Controller(f, self.num_classes, self.controller_reduction, self.semhash,
                                  name=f"controller{k}")
            h = controlled(gp, ctrl, f"conv{k}", x_in, h)
            if k == 2:
                h = nn.max_pool(h, (2, 2), (2, 2))
        feats = h.mean(axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="linear")(feats)
        return finish(gp, logits, feats, capture)
