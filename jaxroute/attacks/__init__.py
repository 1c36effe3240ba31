"""Adversarial attacks as pure, batched, jittable functions over any ``logits_fn(x) -> logits``.

``x`` is a pixel-space batch (B, H, W, C) in [0, 1]; every epsilon is in
[0, 1] pixel units.  Each attack takes a frozen dataclass config (or the
same fields as keywords), optional ``label`` / ``target`` (B,) int arrays
and, where random, an explicit PRNG ``key``; it returns an
:class:`AttackResult` (``adv``, ``success``, ``linf``, ``l2``, ``adv_pred``,
``label``, ``target``, ``iterations``)::

    import functools, jax
    from jaxroute import attacks
    from jaxroute.weights import load_model

    m = load_model("resnet20", "../shared/models/cifar10-resnet/resnet20-12fca82f.th")
    f = functools.partial(m.logits_fn(), None)           # x -> logits, no gates
    res = attacks.bim(f, x, eps=0.01, steps=10)          # DGR paper Eq. 6, predicted label
    run = jax.jit(functools.partial(attacks.pgd, f, config=attacks.PGDConfig(eps=8/255)))
    res = run(x, jax.random.key(0), label=y)

Attacks: :func:`fgsm`, :func:`bim` (iterative FGSM), :func:`pgd` (L∞/L2),
:func:`deepfool`, :func:`cw_l2`, :func:`ensemble_attack`; or by name with
:func:`make_attack`.
"""
from __future__ import annotations

import functools
from typing import Callable

from jaxroute.attacks.core import AttackResult, LogitsFn, check_images, check_labels, num_classes_of
from jaxroute.attacks.cw import CWConfig, cw_l2
from jaxroute.attacks.deepfool import DeepFoolConfig, deepfool
from jaxroute.attacks.ensemble import EnsembleConfig, ensemble_attack, least_likely
from jaxroute.attacks.gradient import (
    BIMConfig, FGSMConfig, PGDConfig, bim, fgsm, pgd,
)

ATTACKS: dict[str, tuple[Callable, type]] = {
    "fgsm": (fgsm, FGSMConfig),
    "bim": (bim, BIMConfig),
    "pgd": (pgd, PGDConfig),
    "deepfool": (deepfool, DeepFoolConfig),
    "cw": (cw_l2, CWConfig),
    "ensemble": (ensemble_attack, EnsembleConfig),
}


def make_attack(name: str, logits_fn: LogitsFn | tuple, jit: bool = True, **config) -> Callable:
    """``make_attack("pgd", f, eps=8/255)`` -> ``attack(x, key=None, label=None, target=None)``.

    The returned function is jitted (unless ``jit=False``) with the config
    static; compiled once per input shape.  For ``"ensemble"``, ``logits_fn``
    is a tuple of logits functions.  Input value checks run eagerly before
    the jitted call.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    fn, cls = ATTACKS[name]
    cfg = cls(**config)
    if name == "ensemble" and callable(logits_fn):
        logits_fn = (logits_fn,)
    core = functools.partial(fn, logits_fn, config=cfg)
    compiled = None
    if jit:
        import jax
        compiled = jax.jit(core)

    first = logits_fn[0] if isinstance(logits_fn, tuple) else logits_fn
    classes: dict = {}

    def attack(x, key=None, label=None, target=None):
        x = check_images(x)
        shape = (tuple(x.shape), str(x.dtype))
        if shape not in classes:
            classes[shape] = num_classes_of(first, x)
        check_labels(label, x.shape[0], "label", classes[shape])
        if not (name == "ensemble" and getattr(target, "ndim", 1) == 2):
            check_labels(target, x.shape[0], "target", classes[shape])
        kw = {}
        if name == "pgd":
            kw["key"] = key
        elif key is not None:
            raise TypeError(f"attack {name!r} is deterministic and takes no key")
        if name not in ("deepfool", "ensemble"):
            kw["label"] = label
        elif name == "deepfool":
            if target is not None:
                raise TypeError("deepfool is untargeted; it takes no target")
            kw["label"] = label
        elif label is not None:
            raise TypeError("the ensemble attack takes no label (it targets the least-likely classes)")
        if name != "deepfool":
            kw["target"] = target
        return (compiled or core)(x, **kw)

    attack.config = cfg
    attack.__name__ = f"{name}_attack"
    return attack


__all__ = [
    "ATTACKS", "AttackResult", "BIMConfig", "CWConfig", "DeepFoolConfig", "EnsembleConfig",
    "FGSMConfig", "LogitsFn", "PGDConfig", "bim", "cw_l2", "deepfool",
    "ensemble_attack", "fgsm", "least_likely", "make_attack", "pgd",
]
