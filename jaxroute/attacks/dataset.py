"""Attack a whole data set: fixed-shape batches split over the local devices, seeded targets.

The one loop behind ``jaxroute attack`` and every experiment that needs
adversarial images; its output is what :func:`jaxroute.data.save_arrays_split`
stores as a routable ``SPLIT.npz``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.attacks.ensemble import mean_probability
from jaxroute.utils.devices import map_batches
from jaxroute.utils.registry import registry_config

ATTACK_TARGETS = ("none", "random", "least_likely")


def _clean_logits(f):
    """Clean logits of a model, or the log of an ensemble's average probability."""
    if callable(f):
        return f
    fs = tuple(f)
    return lambda x: jnp.log(mean_probability(fs, x))


def attack_dataset(f, images, labels, *, attack: str, config=None, targets: str | Sequence[int] = "none",
                   key: jax.Array | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Run attack ``attack`` (a name of :data:`jaxroute.attacks.ATTACKS`) over ``images`` with true ``labels``.

    ``targets``: ``"none"`` (untargeted, away from the true label),
    ``"random"`` (uniform over the classes other than the true one),
    ``"least_likely"`` (the clean model's least likely class other than the
    true one), or an explicit (N,) array of target classes.  The ensemble
    attack is always targeted: ``"none"`` and ``"least_likely"`` give its own
    least-likely targets.  ``key`` seeds the random targets and the attack
    (each batch folds its index in); ``batch_size`` is the global batch (split
    over the local devices when it divides evenly).

    Returns numpy arrays, one row per adversarial image (k rows per image for
    the ensemble attack with k targets): ``images``, ``adv_pred``,
    ``success``, ``linf``, ``l2``, ``labels``, ``clean_pred``, ``target``
    (-1 where untargeted), ``orig_index`` (row of the clean image).
    """
    from jaxroute.attacks import ATTACKS

    config = registry_config(ATTACKS, attack, config, "attack")
    fn = ATTACKS[attack][0]
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"need one integer label per image: {len(images)} images, labels {labels.shape} "
                         f"{labels.dtype}")
    explicit = None
    if isinstance(targets, str):
        if targets not in ATTACK_TARGETS:
            raise ValueError(f"targets must be one of {ATTACK_TARGETS} or an array of classes, got {targets!r}")
        if targets == "none" and attack == "ensemble":
            targets = "least_likely"
    else:
        explicit = np.asarray(targets)
        if explicit.shape != labels.shape or not np.issubdtype(explicit.dtype, np.integer):
            raise ValueError(f"explicit targets must be (N,) integers, one per image; got {explicit.shape} "
                             f"{explicit.dtype} for {len(labels)} images")
        targets = "given"
    if attack == "deepfool" and targets != "none":
        raise ValueError("deepfool is untargeted: use targets='none'")
    if key is None and (targets == "random" or getattr(config, "random_start", False)):
        raise ValueError(f"attack {attack!r} with targets={targets!r} needs an explicit PRNG key")
    k_attack, k_target = jax.random.split(jax.random.key(0) if key is None else key)
    run = jax.jit(functools.partial(fn, f, config=config))
    clean = jax.jit(_clean_logits(f))
    batch_size = min(batch_size, len(images))  # no padding beyond a small data set

    def one_batch(i, x, y, given):
        y = jnp.asarray(y, jnp.int32)
        logits = clean(x)
        k = logits.shape[-1]
        target = None
        if targets == "given":
            target = jnp.asarray(given, jnp.int32)
        elif targets == "least_likely" and attack != "ensemble":  # the ensemble attack's own default
            target = jnp.argmin(jnp.where(jax.nn.one_hot(y, k, dtype=bool), jnp.inf, logits), -1)
        elif targets == "random":
            target = (y + jax.random.randint(jax.random.fold_in(k_target, i), y.shape, 1, k)) % k
        r = run(x, label=y, target=None if target is None else target.astype(jnp.int32),
                key=jax.random.fold_in(k_attack, i))
        reps = r.adv.shape[0] // x.shape[0]  # the ensemble attack returns k adversarials per image
        return {"images": r.adv, "adv_pred": r.adv_pred, "success": r.success, "linf": r.linf, "l2": r.l2,
                "labels": jnp.repeat(y, reps), "clean_pred": jnp.repeat(jnp.argmax(logits, -1), reps),
                "target": r.target if r.target is not None else jnp.full(r.adv.shape[0], -1, jnp.int32)}

    out = map_batches(one_batch, (images, labels, explicit), batch_size)
    reps = len(out["labels"]) // len(images)
    out["orig_index"] = np.repeat(np.arange(len(images), dtype=np.int64), reps)
    return out


def cached_attack_dataset(f, root, name: str, images, labels, *, attack: str, config=None,
                          targets: str | Sequence[int] = "none", orig_index=None, class_names=None,
                          key: jax.Array | None = None, batch_size: int = 256, log=None) -> dict[str, np.ndarray]:
    """:func:`attack_dataset` whose result is kept as the routable ``root/name.npz``.

    When that file exists it is read back instead of attacking again (a resumed
    experiment reuses its adversarial images); otherwise the attack runs and the
    file is written atomically (:func:`jaxroute.data.save_arrays_split`), so a
    killed run never leaves a half-written set.  ``orig_index`` (default: the
    row of each clean image) records where each image came from in a larger
    set.  Returns every array of the file (``images``, ``labels``, ``adv_pred``,
    ``success``, ``linf``, ``l2``, ``clean_pred``, ``target``, ``orig_index``,
    ``class_names`` when given).
    """
    from jaxroute.data import save_arrays_split
    from jaxroute.data.arrays import arrays_split_path

    path = arrays_split_path(root, name)
    if not path.exists():
        a = attack_dataset(f, images, labels, attack=attack, config=config, targets=targets, key=key,
                           batch_size=batch_size)
        if orig_index is not None:
            a["orig_index"] = np.asarray(orig_index, np.int64)
        save_arrays_split(root, name, a.pop("images"), a.pop("labels"), class_names, **a)
        if log is not None:
            log(f"saved {path} ({len(labels)} adversarial images, success {a['success'].mean():.3f})")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
