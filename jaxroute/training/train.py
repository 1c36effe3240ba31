"""Supervised training and fine-tuning: a pure optax ``train_step`` over a TrainState.

The flax-examples shape: a config, ``create_train_state``, a pure jitted
``train_step(state, batch) -> (state, metrics)`` and ``eval_step``; ``fit``
is the host loop around them (shuffling, epochs, progress bar).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jaxroute.data import Dataset, batches
from jaxroute.utils.checks import check_int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # Augmentation: random horizontal flips and random crops with this much padding.
    flip: bool = False
    pad_crop: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            object.__setattr__(self, name, check_int(getattr(self, name), name))   # Python ints for the manifests
        for name in ("lr", "momentum", "weight_decay", "label_smoothing"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0 or not self.momentum < 1 or not self.label_smoothing < 1:
            raise ValueError(f"need lr > 0, momentum < 1 and label_smoothing < 1, got lr={self.lr}, "
                             f"momentum={self.momentum}, label_smoothing={self.label_smoothing}")
        for name in ("pad_crop", "seed"):  # numpy's generators take no negative seeds
            v = getattr(self, name)
            object.__setattr__(self, name, check_int(v, name, 0))


class TrainState(train_state.TrainState):
    batch_stats: Any = struct.field(default_factory=dict)


def create_train_state(module, variables, config: TrainConfig, steps_per_epoch: int) -> TrainState:
    """SGD (Nesterov momentum, weight decay, cosine schedule) over ``variables["params"]``."""
    schedule = optax.cosine_decay_schedule(config.lr, max(1, config.epochs * steps_per_epoch))
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum, nesterov=True),
    )
    return TrainState.create(apply_fn=module.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def _loss(logits, labels, smoothing, mask):
    k = logits.shape[-1]
    onehot = optax.smooth_labels(jax.nn.one_hot(labels, k), smoothing) if smoothing else jax.nn.one_hot(labels, k)
    per = optax.softmax_cross_entropy(logits, onehot)
    return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)


def augment(key, x, flip: bool, pad_crop: int):
    """Random flips / pad-and-crop, per sample, as the CIFAR ResNet trainer does."""
    b, h, w, _ = x.shape
    kf, kc = jax.random.split(key)
    if flip:
        do = jax.random.bernoulli(kf, 0.5, (b,))
        x = jnp.where(do[:, None, None, None], x[:, :, ::-1, :], x)
    if pad_crop:
        p = pad_crop
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offs = jax.random.randint(kc, (b, 2), 0, 2 * p + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(xp, offs)
    return x


def train_step(state: TrainState, x, y, mask, key, config: TrainConfig):
    """One SGD step.  Pure; ``config`` is static under jit."""
    x = augment(key, x, config.flip, config.pad_crop)

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
        return _loss(logits, y, config.label_smoothing, mask), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    acc = jnp.sum((jnp.argmax(logits, -1) == y) * mask) / jnp.maximum(mask.sum(), 1.0)
    return state, {"loss": loss, "accuracy": acc}


def eval_logits(model, dataset: Dataset, batch_size: int = 256) -> np.ndarray:
    """Logits of a :class:`~jaxroute.models.GatedModel` on every image of ``dataset``, (N, K)."""
    fwd = jax.jit(model.logits)
    out = []
    for bt in batches(dataset, batch_size):
        out.append(np.asarray(fwd(bt.images))[: bt.n_valid])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    order = np.argsort(-logits, axis=-1)
    return {f"top{k}": float(np.mean(np.any(order[:, :k] == labels[:, None], axis=1))) for k in ks}


def fit(model, train: Dataset, config: TrainConfig, *, progress: bool = True, log=None) -> dict:
    """Train (or fine-tune) a :class:`~jaxroute.models.GatedModel` from its variables on ``train``;
    returns the new variables (``model.with_variables(...)`` gives the trained model)."""
    from tqdm.auto import tqdm

    n = len(train.labels)
    if n == 0:
        raise ValueError("training set is empty")
    steps = int(np.ceil(n / config.batch_size))
    state = create_train_state(model.module, model.variables, config, steps)
    step = jax.jit(train_step, static_argnames="config", donate_argnums=0)
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    for epoch in range(config.epochs):
        perm = rng.permutation(n)
        shuffled = Dataset(train.images[perm], train.labels[perm], train.class_names, train.name)
        losses, accs = [], []
        bar = tqdm(batches(shuffled, config.batch_size), total=steps, disable=not progress,
                   desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        for bt in bar:
            key, sub = jax.random.split(key)
            mask = (jnp.arange(config.batch_size) < bt.n_valid).astype(jnp.float32)
            state, m = step(state, bt.images, bt.labels, mask, sub, config=config)
            losses.append(m["loss"])
            accs.append(m["accuracy"])
        if log is not None:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {float(np.mean(jax.device_get(losses))):.4f} "
                f"train acc {float(np.mean(jax.device_get(accs))):.4f}")
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
