"""Training a decoupled model: the pure ``decouple_step`` and the resumable epoch loop.

Loss (Eq. 12): CE + λm·Lmi + λk·Lkl + λs·Ls (:mod:`jaxroute.decoupling.losses`),
SemHash noise on every controller (``rngs={"semhash": key}``).  Optimiser as
the official code: SGD, momentum 0.9, weight decay 1e-4 on every parameter
(``optax.add_decayed_weights`` before ``optax.sgd``, PyTorch's order), lr 0.1
divided by 10 at 50 % and 75 % of the epochs, batch 128, crop (pad 4) + flip,
all weights trained from the pretrained model.

Optional first stage (``freeze_backbone_epochs``): only the controllers
train (``optax.multi_transform`` sets the backbone's updates to zero) and the
backbone's batch norm uses and keeps its running statistics, so the network the
controllers learn to gate is exactly the pretrained one.  The joint stage that
follows starts a fresh optimiser state at ``joint_lr`` (default ``lr``) with the
milestones counted over the joint epochs.

Deviations: the last incomplete batch of an epoch is dropped (Improved SemHash
binarises exactly ⌊B/2⌋ samples of a full batch; the code keeps it); the
frozen stage and ``joint_lr`` are additions for short schedules.

Checkpoints: after every epoch the full state (parameters, batch statistics,
optimiser state, step) is written with orbax under ``OUT/train_state/``;
shuffling is seeded per epoch and the step keys are ``fold_in(key, step)``, so a
resumed run computes exactly the parameters of an uninterrupted one.  A
non-finite loss term stops training with an error naming the term and the
epoch; the last checkpoint (of the previous epoch) is kept.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from flax import struct

from jaxroute.data import Dataset
from jaxroute.decoupling import losses
from jaxroute.decoupling.model import controller_labels
from jaxroute.training.train import augment
from jaxroute.utils.checks import check_int

TERMS = ("ce", "mi", "kl", "sparse")
STATE_DIR = "train_state"
PROGRESS_FILE = "progress.json"


@dataclasses.dataclass(frozen=True)
class DecoupleConfig:
    """Hyper-parameters; defaults are the paper's / official README's (see the module doc)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    joint_lr: float | None = None             # lr of the joint stage (None: lr)
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the joint epochs where lr is divided
    lr_decay: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lambda_m: float = 0.01
    lambda_k: float = 1.0
    lambda_s: float = 0.00015
    target_ratio: float = 0.0                 # R
    kl_direction: str = "z_y"
    kl_reduction: str = "mean"
    sparse_per_sample: bool = False
    freeze_backbone_epochs: int = 0
    flip: bool = True
    pad_crop: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            object.__setattr__(self, name, check_int(getattr(self, name), name))   # Python ints for the manifests
        for name in ("freeze_backbone_epochs", "pad_crop", "seed"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, 0))
        if self.freeze_backbone_epochs > self.epochs:
            raise ValueError(f"freeze_backbone_epochs ({self.freeze_backbone_epochs}) exceeds epochs ({self.epochs})")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (SemHash binarises half of each batch), got {self.batch_size}")
        for name in ("lr", "momentum", "weight_decay", "lambda_m", "lambda_k", "lambda_s", "target_ratio",
                     "lr_decay") + (("joint_lr",) if self.joint_lr is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not self.lr > 0 or (self.joint_lr is not None and not self.joint_lr > 0):
            raise ValueError(f"lr and joint_lr must be > 0, got lr={self.lr}, joint_lr={self.joint_lr}")
        if not self.momentum < 1:
            raise ValueError(f"momentum must be < 1, got {self.momentum}")
        if not 0 <= self.target_ratio <= 1:
            raise ValueError(f"target_ratio R must be in [0, 1], got {self.target_ratio}")
        if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in self.milestones) \
                or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing fractions in (0, 1), got {self.milestones!r}")
        if self.kl_direction not in losses.KL_DIRECTIONS:
            raise ValueError(f"kl_direction must be one of {losses.KL_DIRECTIONS}, got {self.kl_direction!r}")
        if self.kl_reduction not in losses.KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {losses.KL_REDUCTIONS}, got {self.kl_reduction!r}")

    def frozen(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) trains the controllers only."""
        return epoch < self.freeze_backbone_epochs

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


class DecoupleState(train_state.TrainState):
    batch_stats: Any = struct.field(default_factory=dict)


def make_tx(config: DecoupleConfig, params, frozen: bool, steps_per_epoch: int):
    """The stage's optimiser: SGD + weight decay; the frozen stage masks the backbone out."""
    labels = controller_labels(params) if frozen else None
    return _make_tx(config, frozen, steps_per_epoch, jax.tree_util.tree_structure(labels),
                    tuple(jax.tree.leaves(labels)))


def lr_boundaries(milestones, epochs: int, steps_per_epoch: int, decay: float) -> dict:
    """``{step: scale}`` for ``optax.piecewise_constant_schedule``: one ``decay`` per milestone.

    Milestones are fractions of ``epochs`` rounded to whole epochs; on a short schedule two
    can round to the same epoch, and their decays multiply there (a dict keyed by step would
    otherwise keep only one).
    """
    out: dict = {}
    for m in milestones:
        step = int(round(m * epochs)) * steps_per_epoch
        out[step] = out.get(step, 1.0) * decay
    return out


@functools.lru_cache(maxsize=16)
def _make_tx(config, frozen, steps_per_epoch, label_def, label_leaves):
    # Cached: the optimiser is a static part of the train state, so an equal one (the same
    # object) lets jit reuse the compiled step across stages, resumes and runs.
    if frozen:
        sgd = optax.chain(optax.add_decayed_weights(config.weight_decay),
                          optax.sgd(config.lr, momentum=config.momentum))
        return optax.multi_transform({"controller": sgd, "backbone": optax.set_to_zero()},
                                     jax.tree_util.tree_unflatten(label_def, label_leaves))
    joint = config.epochs - config.freeze_backbone_epochs
    lr = config.lr if config.joint_lr is None else config.joint_lr
    schedule = optax.piecewise_constant_schedule(lr, lr_boundaries(config.milestones, joint, steps_per_epoch,
                                                                   config.lr_decay))
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum))


def create_state(model, config: DecoupleConfig, frozen: bool, steps_per_epoch: int, variables=None) -> DecoupleState:
    variables = model.variables if variables is None else variables
    tx = make_tx(config, variables["params"], frozen, steps_per_epoch)
    state = DecoupleState.create(apply_fn=model.module.apply, params=variables["params"], tx=tx,
                                 batch_stats=variables.get("batch_stats", {}))
    return state.replace(step=jnp.zeros((), jnp.int32))  # an array from the start: one compiled step


def decouple_loss(params, state: DecoupleState, x, y, key, config: DecoupleConfig, frozen: bool):
    """Total loss and ``(terms, logits, new batch_stats, z)`` of one batch."""
    variables = {"params": params, "batch_stats": state.batch_stats}
    if frozen:  # backbone BN on (and keeping) its running statistics
        logits, cap = state.apply_fn(variables, x, train=False, capture=True, rngs={"semhash": key})
        new_stats = state.batch_stats
    else:
        (logits, cap), upd = state.apply_fn(variables, x, train=True, capture=True, rngs={"semhash": key},
                                            mutable=["batch_stats"])
        new_stats = upd["batch_stats"]
    ex = cap["decouple"]
    z = {p: e["z"] for p, e in ex.items()}
    terms = {
        "ce": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
        "mi": losses.mi({p: e["mi_logits"] for p, e in ex.items()}, y),
        "kl": losses.kl(z, {p: e["ybar"] for p, e in ex.items()}, config.kl_direction, config.kl_reduction),
        "sparse": losses.sparse(z, config.target_ratio, config.sparse_per_sample),
    }
    total = (terms["ce"] + config.lambda_m * terms["mi"] + config.lambda_k * terms["kl"]
             + config.lambda_s * terms["sparse"])
    return total, (terms, logits, new_stats, z)


def decouple_step(state: DecoupleState, batch, key, config: DecoupleConfig = DecoupleConfig(),
                  frozen: bool = False):
    """One SGD step on a batch ``(x, y)``.  Pure; ``config`` and ``frozen`` are static under jit."""
    x, y = batch
    k_aug, k_sem = jax.random.split(key)
    x = augment(k_aug, x, config.flip, config.pad_crop)
    grad_fn = jax.value_and_grad(decouple_loss, has_aux=True)
    (total, (terms, logits, new_stats, z)), grads = grad_fn(state.params, state, x, y, k_sem, config, frozen)
    state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    metrics = {**terms, "total": total, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
               "active_fraction": sum(v.sum() for v in z.values()) / sum(v.size for v in z.values())}
    return state, metrics


_jitted_step = jax.jit(decouple_step, static_argnames=("config", "frozen"))


# ---------------------------------------------------------------- the host loop
def _state_tree(state: DecoupleState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
            "step": state.step}


def save_state(directory: Path, epoch: int, state: DecoupleState) -> None:
    import orbax.checkpoint as ocp

    target = directory / f"epoch_{epoch:05d}"
    if target.exists():
        shutil.rmtree(target)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target.absolute(), jax.device_get(_state_tree(state)))
    ckptr.wait_until_finished()


def restore_state(directory: Path, epoch: int, state: DecoupleState) -> DecoupleState:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, jax.device_get(_state_tree(state)))
    tree = ocp.StandardCheckpointer().restore((directory / f"epoch_{epoch:05d}").absolute(), abstract)
    return state.replace(**tree)


def _progress(out: Path) -> dict | None:
    f = out / PROGRESS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _shard(tree):
    """Split the batch axis over the local devices (parameters stay replicated)."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return tree
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    sharding = NamedSharding(Mesh(np.array(devices), ("batch",)), P("batch"))
    return jax.device_put(tree, sharding)


def train_decoupled(model, train: Dataset, out: str | Path, config: DecoupleConfig, *, log=None,
                    stop_after: int | None = None) -> tuple[Any, list[dict]]:
    """Train ``model`` (a decoupled GatedModel) on ``train``, checkpointing each epoch under ``out``.

    Resumes from ``out`` when it holds a run with the same config.  ``stop_after``
    ends the call after that many epochs in total (as if killed; the run resumes later).
    Returns ``(variables, history)``, history having one dict of mean metrics per epoch.
    """
    from jaxroute.utils.io import atomic_write_text

    out = Path(out)
    sdir = out / STATE_DIR
    n = len(train.labels)
    steps = n // config.batch_size
    if steps == 0:
        raise ValueError(f"the training set ({n} images) is smaller than one batch ({config.batch_size})")
    if config.batch_size % len(jax.local_devices()):
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {len(jax.local_devices())} "
                         "local devices")
    progress = _progress(out)
    if progress is not None and progress["config"] != config.to_json():
        raise ValueError(f"{out} holds a run with another configuration; use a new --out or --overwrite")
    done = progress["epochs_done"] if progress else 0
    history = progress["history"] if progress else []
    frozen = config.frozen(max(done - 1, 0))
    state = create_state(model, config, frozen, steps)
    if done:
        state = restore_state(sdir, done, state)
        if log:
            log(f"resuming from epoch {done} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    base_key = jax.random.key(config.seed)
    last = config.epochs if stop_after is None else min(config.epochs, stop_after)
    for epoch in range(done, last):
        if config.frozen(epoch) != frozen:  # stage change: fresh optimiser for the joint stage
            frozen = config.frozen(epoch)
            state = create_state(model, config, frozen, steps,
                                 {"params": state.params, "batch_stats": state.batch_stats})
        t0 = time.perf_counter()
        perm = np.random.default_rng([config.seed, epoch]).permutation(n)
        metrics = []
        for b in range(steps):  # full batches only (see the module doc)
            idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
            batch = (jnp.asarray(train.images[idx]), jnp.asarray(train.labels[idx]))
            key = jax.random.fold_in(base_key, epoch * steps + b)
            state, m = _jitted_step(state, _shard(batch), key, config=config, frozen=frozen)
            metrics.append(m)
        metrics = jax.device_get(metrics)
        mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
        for term in TERMS + ("total",):
            bad = [i for i, m in enumerate(metrics) if not np.isfinite(m[term])]
            if bad:
                kept = f"the checkpoint of epoch {done}" if epoch else "no checkpoint (none was written)"
                raise ValueError(f"loss term {term!r} is not finite in epoch {epoch + 1} (first at step {bad[0]}); "
                                 f"training stopped, {kept} is kept in {out}")
        mean["seconds"] = time.perf_counter() - t0
        mean["frozen_backbone"] = frozen
        history.append(mean)
        save_state(sdir, epoch + 1, state)
        atomic_write_text(out / PROGRESS_FILE, json.dumps(
            {"epochs_done": epoch + 1, "config": config.to_json(), "history": history}, indent=1))
        for old in sdir.glob("epoch_*"):  # keep the newest checkpoint only
            if old.name != f"epoch_{epoch + 1:05d}":
                shutil.rmtree(old)
        done = epoch + 1
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}{' (backbone frozen)' if frozen else ''}: "
                + " ".join(f"{k} {mean[k]:.4f}" for k in TERMS) + f" acc {mean['accuracy']:.4f} "
                f"active {mean['active_fraction']:.3f} ({mean['seconds']:.1f} s)")
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats}), history


def evaluate(model, dataset: Dataset, batch_size: int = 256) -> dict:
    """Eval-mode accuracy, calculation-path statistics and MACs of a decoupled model on ``dataset``.

    Returns ``test_top1``, ``test_top5``, ``active_fraction`` (mean of z over every gate
    of every input), ``macs_mean`` (per sample, controllers included), ``macs_dense``,
    ``macs_reduction`` (dense / mean) and ``filter_states`` (:func:`~jaxroute.decoupling.model.filter_states`).
    """
    from jaxroute.data import batches
    from jaxroute.decoupling.flops import dense_macs, macs_per_sample
    from jaxroute.decoupling.model import filter_states
    from jaxroute.training.train import topk_accuracy

    @jax.jit
    def fwd(x):
        logits, cap = model.module.apply(model.variables, x, capture=True)
        return logits, {p: e["z"] for p, e in cap["decouple"].items()}

    logits, zs = [], []
    for bt in batches(dataset, batch_size):
        lg, z = jax.device_get(fwd(jnp.asarray(bt.images)))
        logits.append(lg[: bt.n_valid])
        zs.append({p: v[: bt.n_valid] for p, v in z.items()})
    if not logits:
        raise ValueError("the evaluation set is empty")
    logits = np.concatenate(logits)
    z = {p: np.concatenate([d[p] for d in zs]) for p in zs[0]}
    acc = topk_accuracy(logits, np.asarray(dataset.labels), (1, min(5, logits.shape[-1])))
    macs = macs_per_sample(model, z)
    dense = dense_macs(model)
    return {"test_top1": acc["top1"], "test_top5": acc[f"top{min(5, logits.shape[-1])}"],
            "active_fraction": float(np.mean(np.concatenate([v.reshape(len(v), -1) for v in z.values()], 1))),
            "macs_mean": float(macs.mean()), "macs_dense": dense, "macs_reduction": float(dense / macs.mean()),
            "filter_states": filter_states(z)}
