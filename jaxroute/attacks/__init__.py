"""Adversarial attacks as pure, batched, jittable functions of one shape.

Every attack is ``attack(f, x, *, label=None, target=None, key=None,
config=None) -> AttackResult``: ``f(x) -> logits`` (a tuple of such
functions for the ensemble attack), ``x`` a pixel-space batch (B, H, W, C)
in [0, 1], every epsilon in [0, 1] pixel units, optional ``label`` /
``target`` (B,) int arrays, an explicit PRNG ``key`` where the attack is
random (deterministic attacks ignore it), and the attack's frozen config
dataclass.  The result holds ``adv``, ``success``, ``linf``, ``l2``,
``adv_pred``, ``label``, ``target``, ``iterations``::

    import jax
    from jaxroute import attacks
    from jaxroute.weights import load_model

    m = load_model("resnet20", "resnet20-12fca82f.th")
    res = attacks.bim(m.logits, x, config=attacks.BIMConfig(eps=0.01, steps=10))  # DGR paper Eq. 6
    pgd = attacks.make_attack("pgd", m.logits, eps=8 / 255)                        # jitted, by name
    res = pgd(x, label=y, key=jax.random.key(0))

Attacks: :func:`fgsm`, :func:`bim` (iterative FGSM), :func:`pgd` (L∞/L2),
:func:`deepfool`, :func:`cw_l2`, :func:`ensemble_attack`; by name with
:func:`make_attack`; over a whole data set with :func:`attack_dataset`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from jaxroute.attacks.core import AttackResult, LogitsFn, check_images, is_concrete, num_classes_of
from jaxroute.attacks.cw import CWConfig, cw_l2
from jaxroute.attacks.dataset import ATTACK_TARGETS, attack_dataset, cached_attack_dataset
from jaxroute.attacks.deepfool import DeepFoolConfig, deepfool
from jaxroute.attacks.ensemble import EnsembleConfig, ensemble_attack, least_likely
from jaxroute.attacks.gradient import BIMConfig, FGSMConfig, PGDConfig, bim, fgsm, pgd
from jaxroute.utils.registry import registry_config

ATTACKS: dict[str, tuple[Callable, type]] = {
    "fgsm": (fgsm, FGSMConfig),
    "bim": (bim, BIMConfig),
    "pgd": (pgd, PGDConfig),
    "deepfool": (deepfool, DeepFoolConfig),
    "cw": (cw_l2, CWConfig),
    "ensemble": (ensemble_attack, EnsembleConfig),
}


def make_attack(name: str, f: LogitsFn | tuple, jit: bool = True, **config) -> Callable:
    """``make_attack("pgd", f, eps=8/255)`` -> ``attack(x, *, label=None, target=None, key=None)``.

    ``config`` are the fields of the attack's config dataclass.  The returned
    function is jitted (unless ``jit=False``) with the config static and
    compiled once per input shape; images are value-checked eagerly before
    the jitted call (inside ``jit`` only shapes are).
    """
    registry_config(ATTACKS, name, None, "attack")  # an unknown name: the error every registry gives
    fn, cls = ATTACKS[name]
    core = functools.partial(fn, f, config=cls(**config))
    run = jax.jit(core) if jit else core
    first = f[0] if isinstance(f, (tuple, list)) else f
    classes: dict = {}

    def attack(x, *, label=None, target=None, key=None):
        if is_concrete(x):
            x = check_images(x)
            shape = (tuple(x.shape), str(x.dtype))
            if shape not in classes:
                classes[shape] = num_classes_of(first, x)
            for what, y in (("label", label), ("target", target)):
                _check_class_values(y, what, classes[shape])
        return run(x, label=label, target=target, key=key)

    attack.config = core.keywords["config"]
    attack.__name__ = f"{name}_attack"
    return attack


def _check_class_values(y, name: str, num_classes: int) -> None:
    """Class indices in [0, num_classes), checked on concrete arrays (shapes are each attack's own check)."""
    if y is None or not is_concrete(y):
        return
    a = np.asarray(y)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be integer class indices, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} must be class indices in [0, {num_classes}), got values in [{a.min()}, {a.max()}]")


__all__ = [
    "ATTACKS", "ATTACK_TARGETS", "AttackResult", "BIMConfig", "CWConfig", "DeepFoolConfig", "EnsembleConfig",
    "FGSMConfig", "LogitsFn", "PGDConfig", "attack_dataset", "bim", "cached_attack_dataset", "cw_l2", "deepfool",
    "ensemble_attack", "fgsm", "least_likely", "make_attack", "pgd",
]
