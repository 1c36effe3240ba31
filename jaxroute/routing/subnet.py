"""Class-specific subnetworks (Wang, Hu, Su, "Interpret neural networks by extracting critical
subnetworks", arXiv:1910.02673, Eq. 1-3 and section 4), all classes in one compiled program.

For every class c a gate vector Λ_c (one gate per output channel of every gate
point, the CDRP layout of ``model.spec``) minimises

    L_c(Λ) = mean_x BCE(σ(f^c_Λ(x)), σ(f^c(x))) + γ ||Λ||_1

over a *balanced* set: every training image of class c plus as many images of
the other classes drawn at random, redrawn each epoch.  f^c is the logit of
class c of the full network, f^c_Λ the same logit with the gates Λ; the full
network's probability σ(f^c(x)) is the soft target.  Adam (lr 0.1), batch 64,
γ = 0.05, T = 5 epochs, and the subnetwork kept is "the one with the lowest
loss below the sparsity level τ = 0.5".

Deviations from the paper, in the defaults (``SubnetConfig(bce_reduction="mean",
lr=0.1)`` is the paper as written):

* **The BCE is summed over the batch** (``bce_reduction="sum"``), not
  averaged.  As written, a mean BCE (below ln 2 ≈ 0.69 per image) against
  γ·||Λ||_1 = 0.05 × 688 = 34 at Λ = 1 (ResNet-20's gates) is minimised by
  cutting the network: on the pretrained CIFAR-10 ResNet-20 every class
  closes all of ``conv1``'s gates within five epochs, logit c becomes a
  constant and its one-vs-rest AUC 0.5.  Summed over the 64 images of a
  batch the two terms are of one size.  The paper does not say how its BCE
  is reduced nor for how many gates γ was set.
* **Adam lr 0.01**, not 0.1.  Adam's steps have the size of the learning
  rate whatever the gradient's scale, and steps of 0.1 on gates of about 1
  move the class logit far from the full network's.
* What this gives on all 50,000 CIFAR-10 training images (785 steps per
  class): every subnetwork keeps its AUC within 1.3 points of the full
  network's, at 84-93% of the gates open: none reaches τ = 0.5, so every
  class is flagged (``fallback``).  A larger γ trades AUC for sparsity.

Choices where the paper is silent (each one a :class:`SubnetConfig` field):

* **Initialisation** Λ = 1 (the full network), **clipping** to [0, 10] after
  every step and the L1 term by its subgradient γ·sign(Λ) -- all as in DGR by
  the same first author (:mod:`jaxroute.routing.dgr`).
* **Sparsity** is the fraction of gates > 0 (so a *smaller* value is a sparser
  subnetwork, and "below τ" reads sparsity <= τ).
* **Snapshots**: one per epoch, the gates at the end of the epoch.  Its loss is
  L_c evaluated with those gates over that epoch's balanced set (one extra
  forward pass per epoch), not the running mean of the step losses, which mixes
  gates of the whole epoch.  The step losses are kept too (``train_loss``).
* **Selection**: the lowest-loss snapshot with sparsity <= τ; if no snapshot of
  a class reaches τ, the sparsest one (ties: the lower loss), flagged in
  ``fallback``.
* **Epochs and batches**: the balanced set is shuffled and cut into batches of
  ``batch_size``; the last batch of an epoch is partial (its loss is the mean
  over its real images).  Negatives are drawn without replacement from the
  other classes; when they hold fewer images than class c, all of them are used.
* **Randomness**: epoch e of class c draws with ``fold_in(fold_in(key, e), c)``,
  so a class distilled alone sees exactly the images it sees among all K.

Batched formulation.  The K classes' gates form one (K, D) matrix and each step
takes one batch per class, (K, B) images in all.  The network runs in inference
mode, so class k's loss depends only on row k: the gradient of the *summed*
loss is exactly the stack of per-class gradients, and one forward/backward pass
over K·B images serves every class.  The optax Adam update is ``vmap``-ped
(one optimiser state per class) and an epoch's steps run in one ``lax.scan``:
one compiled program per epoch shape, no host synchronisation inside it.
Classes have different image counts; a class whose epoch is shorter than the
longest one skips the remaining steps (its gates and Adam state are left as
they are), which keeps every class's trajectory the one it has alone.

The paper gates "every layer's output channels"; here the gates sit where the
model's gate placement puts them (``post_act`` by default: after each BN+ReLU
and after each residual ReLU).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxroute.utils.checks import check_finite, check_int
from jaxroute.utils.conv_grads import loop_friendly
from jaxroute.utils.io import atomic_save_npz, atomic_write_json

MANIFEST = "manifest.json"
STATE = "state.npz"
SUBNETS = "subnets.npz"
FORMAT = "jaxroute-subnets-v1"
BCE_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class SubnetConfig:
    """Hyper-parameters of the class-subnetwork distillation; defaults are the paper's but for
    ``lr`` and ``bce_reduction`` (the paper: 0.1 and "mean"; the module doc says why).

    ``init``, ``clip_min``/``clip_max``, the sparsity measure and the snapshot
    rule are not given in the paper (see the module doc for the choices).
    """

    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    gamma: float = 0.05
    tau: float = 0.5
    init: float = 1.0
    clip_min: float = 0.0
    clip_max: float = 10.0
    seed: int = 0
    bce_reduction: str = "sum"    # or "mean" over the batch (the paper's "mean BCE")

    def __post_init__(self):
        if self.bce_reduction not in BCE_REDUCTIONS:
            raise ValueError(f"subnet bce_reduction must be one of {BCE_REDUCTIONS}, got {self.bce_reduction!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            object.__setattr__(self, name, check_int(getattr(self, name), f"subnet {name}", low))  # Python ints
        for name in ("lr", "gamma", "tau", "init", "clip_min", "clip_max"):
            check_finite(getattr(self, name), f"subnet {name}")
        if not self.lr > 0:
            raise ValueError(f"subnet lr must be > 0, got {self.lr}")
        if self.gamma < 0:
            raise ValueError(f"subnet gamma must be >= 0, got {self.gamma}")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"subnet tau (a fraction of gates > 0) must be in [0, 1], got {self.tau}")
        if not self.clip_min < self.clip_max:
            raise ValueError(f"subnet needs clip_min < clip_max, got [{self.clip_min}, {self.clip_max}]")
        if not self.clip_min <= self.init <= self.clip_max:
            raise ValueError(f"subnet init must lie in [clip_min, clip_max] = [{self.clip_min}, "
                             f"{self.clip_max}], got {self.init}")

    def optimizer(self) -> optax.GradientTransformation:
        # Plain Adam (optax defaults b1 0.9, b2 0.999, eps 1e-8): the L1 term is the only regulariser.
        return optax.adam(self.lr)


class Subnets(NamedTuple):
    """Distilled subnetworks of the classes ``classes`` (row k is class ``classes[k]``)."""

    gates: np.ndarray           # (K, D) the selected snapshot of every class
    sparsity: np.ndarray        # (K,) fraction of its gates > 0
    selected_epoch: np.ndarray  # (K,) 1-based epoch of the selected snapshot
    fallback: np.ndarray        # (K,) bool: no snapshot reached sparsity <= tau; the sparsest was kept
    classes: np.ndarray         # (K,) class indices
    snapshot_gates: np.ndarray  # (T, K, D) the gates at the end of every epoch
    snapshot_loss: np.ndarray   # (T, K) L_c of every snapshot on its epoch's balanced set
    snapshot_sparsity: np.ndarray  # (T, K)
    train_loss: np.ndarray      # (T, K) mean of the step losses of every epoch


# --------------------------------------------------------------------------- pieces
def subnet_loss(logit: jax.Array, target_logit: jax.Array, weight: jax.Array, gates: jax.Array,
                gamma: float, reduction: str = "mean") -> tuple[jax.Array, jax.Array]:
    """Eq. 3 for a batch of one class: (BCE + γ·||Λ||_1, BCE), the BCE a mean over the
    batch (``reduction="mean"``) or its sum (``"sum"``).

    ``logit``/``target_logit``/``weight`` are (..., B): the gated and the full
    network's logit of the class and a 0/1 weight (0 marks padding, left out of
    the mean or sum); ``gates`` (..., D).
    """
    bce = optax.sigmoid_binary_cross_entropy(logit, jax.nn.sigmoid(target_logit))
    ce = jnp.sum(weight * bce, -1)
    if reduction == "mean":
        ce = ce / jnp.maximum(jnp.sum(weight, -1), 1)
    elif reduction != "sum":
        raise ValueError(f"reduction must be one of {BCE_REDUCTIONS}, got {reduction!r}")
    return ce + gamma * jnp.sum(jnp.abs(gates), -1), ce


def select_snapshot(loss, sparsity, tau: float):
    """(index, fallback) per class from (T, K) snapshot losses and sparsities.

    The lowest-loss snapshot with sparsity <= ``tau``; where there is none, the
    sparsest (ties: the lower loss) and ``fallback`` True.  Pure jnp, jittable.
    """
    loss, sparsity = jnp.asarray(loss), jnp.asarray(sparsity)
    ok = sparsity <= tau
    best_ok = jnp.argmin(jnp.where(ok, loss, jnp.inf), axis=0)
    sparsest = sparsity == jnp.min(sparsity, axis=0)
    best_sparse = jnp.argmin(jnp.where(sparsest, loss, jnp.inf), axis=0)
    fallback = ~jnp.any(ok, axis=0)
    return jnp.where(fallback, best_sparse, best_ok), fallback


def balanced_epoch(key: jax.Array, labels, classes: Sequence[int], batch_size: int):
    """The balanced sets of one epoch, cut into batches: (idx (K, S, B) int32, weight (K, S, B)).

    Class ``classes[k]`` draws with ``fold_in(key, classes[k])``: all its
    images plus as many images of other classes (without replacement; all of
    them if they are fewer), shuffled.  S is the longest class's batch count;
    padding rows and the steps a shorter class does not have carry weight 0.
    """
    labels = np.asarray(labels)
    sets = []
    for c in classes:
        kc = jax.random.fold_in(key, int(c))
        k_neg, k_perm = jax.random.split(kc)
        pos = np.flatnonzero(labels == c)
        if len(pos) == 0:
            raise ValueError(f"class {c} has no training images; a subnetwork needs at least one")
        others = np.flatnonzero(labels != c)
        n_neg = min(len(pos), len(others))
        order = np.asarray(jax.random.permutation(k_neg, len(others)))
        members = np.concatenate([pos, others[order[:n_neg]]])
        sets.append(members[np.asarray(jax.random.permutation(k_perm, len(members)))])
    steps = max(-(-len(s) // batch_size) for s in sets)
    idx = np.zeros((len(sets), steps * batch_size), np.int32)
    weight = np.zeros((len(sets), steps * batch_size), np.float32)
    for k, s in enumerate(sets):
        idx[k, :len(s)] = s
        weight[k, :len(s)] = 1
    return idx.reshape(len(sets), steps, batch_size), weight.reshape(len(sets), steps, batch_size)


@functools.lru_cache(maxsize=8)  # one compilation per (model, config) and shape in a process
def epoch_program(model, config: SubnetConfig) -> Callable:
    """The jitted epoch: ``fn(gates, opt_state, images, full_logits, idx, weight, classes)``.

    ``gates`` (K, D); ``opt_state`` the vmapped Adam state; ``images`` (N, H,
    W, C) and ``full_logits`` (N, classes) of the whole training set; ``idx`` /
    ``weight`` (K, S, B) from :func:`balanced_epoch`; ``classes`` (K,).
    Returns ``(gates, opt_state, snapshot_loss (K,), train_loss (K,))``.
    """
    opt = config.optimizer()
    spec = model.spec
    logits_fn = loop_friendly(lambda g, x: model.logits(x, g))

    def class_logits(g, x_idx, images, classes):
        k, b = x_idx.shape
        x = images[x_idx.reshape(-1)]
        rows = jnp.repeat(g, b, axis=0)  # sample k*b+j runs with class k's gates
        logits = logits_fn(spec.split(rows), x).reshape(k, b, -1)
        return jnp.take_along_axis(logits, classes[:, None, None], axis=-1)[..., 0]

    def targets(full_logits, x_idx, classes):
        return full_logits[x_idx, classes[:, None]]

    def ce_sum(g, x_idx, w, images, full_logits, classes):
        z = class_logits(g, x_idx, images, classes)
        _, ce = subnet_loss(z, targets(full_logits, x_idx, classes), w, g, 0.0, config.bce_reduction)
        return ce.sum(), ce

    def fn(gates, opt_state, images, full_logits, idx, weight, classes):
        def step(carry, batch):
            g, state = carry
            x_idx, w = batch
            (_, ce), grad = jax.value_and_grad(ce_sum, has_aux=True)(g, x_idx, w, images, full_logits, classes)
            grad = grad + config.gamma * jnp.sign(g)  # the L1 subgradient, as in DGR
            upd, new_state = jax.vmap(opt.update)(grad, state, g)
            new_g = jnp.clip(optax.apply_updates(g, upd), config.clip_min, config.clip_max)
            active = jnp.sum(w, -1) > 0  # a class whose epoch has ended keeps gates and Adam state
            keep = lambda new, old: jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
            g = keep(new_g, g)
            state = jax.tree.map(keep, new_state, state)
            loss = ce + config.gamma * jnp.sum(jnp.abs(carry[0]), -1)
            return (g, state), (loss, active)

        batches = (jnp.swapaxes(idx, 0, 1), jnp.swapaxes(weight, 0, 1))  # scan over steps
        (g, state), (losses, active) = jax.lax.scan(step, (gates, opt_state), batches)
        train_loss = jnp.sum(jnp.where(active, losses, 0), 0) / jnp.maximum(jnp.sum(active, 0), 1)

        def evaluate(acc, batch):  # the snapshot's loss over this epoch's balanced set
            x_idx, w = batch
            z = class_logits(g, x_idx, images, classes)
            bce = optax.sigmoid_binary_cross_entropy(z, jax.nn.sigmoid(targets(full_logits, x_idx, classes)))
            return (acc[0] + jnp.sum(w * bce, -1), acc[1] + jnp.sum(w, -1)), None

        zero = jnp.zeros(gates.shape[0], gates.dtype)
        (bce_sum, count), _ = jax.lax.scan(evaluate, (zero, zero), batches)
        # per image, times a full batch under "sum": the objective of one batch at these gates
        per_batch = config.batch_size if config.bce_reduction == "sum" else 1
        snap_loss = per_batch * bce_sum / jnp.maximum(count, 1) + config.gamma * jnp.sum(jnp.abs(g), -1)
        return g, state, snap_loss, train_loss

    return jax.jit(fn)


def full_logits(model, images, batch_size: int = 256) -> np.ndarray:
    """Logits of the ungated network on ``images`` (N, classes), in fixed-shape batches."""
    from jaxroute.utils.devices import map_batches

    f = _logits_program(model)
    return map_batches(lambda i, x: f(x), [images], min(batch_size, len(images)))


@functools.lru_cache(maxsize=8)  # one compilation per model and shape in a process (e.g. several seeds)
def _logits_program(model) -> Callable:
    return jax.jit(lambda x: model.logits(x))


# --------------------------------------------------------------------------- the distillation
class _State(NamedTuple):
    epochs_done: int
    gates: np.ndarray
    opt_leaves: list
    snapshot_gates: list
    snapshot_loss: list
    snapshot_sparsity: list
    train_loss: list


def _check_classes(classes, num_classes: int) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.ndim != 1 or len(classes) == 0 or not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be a non-empty 1-D sequence of class indices, got {classes!r}")
    if classes.min() < 0 or classes.max() >= num_classes or len(set(classes.tolist())) != len(classes):
        raise ValueError(f"classes must be distinct indices in [0, {num_classes}), got {classes.tolist()}")
    return classes.astype(np.int32)


def distill_subnets(model, images, labels, *, config: SubnetConfig = SubnetConfig(), classes=None,
                    logits=None, state: _State | None = None,
                    on_epoch: Callable[[_State], Any] | None = None,
                    log: Callable[[str], Any] | None = None) -> Subnets:
    """Distil the subnetworks of ``classes`` (default: every class of the model) from a training set.

    ``images`` (N, H, W, C) in [0, 1] (their dtype is the gates' dtype) and
    ``labels`` (N,); ``logits`` the full network's logits on them if already
    computed.  ``state`` resumes from an earlier epoch and ``on_epoch(state)`` is
    called after every epoch (:func:`distill_to_dir` saves it there).  Every
    epoch runs as one compiled program (:func:`epoch_program`).
    """
    images = jnp.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"need images (N, H, W, C) and labels (N,), got {images.shape} and {labels.shape}")
    if tuple(images.shape[1:]) != tuple(model.input_shape):
        raise ValueError(f"images have shape {tuple(images.shape[1:])}, model {model.name} expects "
                         f"{tuple(model.input_shape)}")
    classes = _check_classes(np.arange(model.num_classes) if classes is None else classes, model.num_classes)
    k, d = len(classes), model.spec.size
    opt = config.optimizer()
    gates0 = jnp.full((k, d), config.init, images.dtype)
    state0 = jax.vmap(opt.init)(gates0)
    treedef = jax.tree.structure(state0)
    if state is None:
        state = _State(0, np.asarray(gates0), [np.asarray(v) for v in jax.tree.leaves(state0)], [], [], [], [])
    if logits is None and state.epochs_done < config.epochs:
        logits = full_logits(model, images)
    logits = None if logits is None else jnp.asarray(logits, images.dtype)
    # the seed, epoch count and tau never enter the compiled epoch: runs that differ only there share it
    run = epoch_program(model, dataclasses.replace(config, seed=0, epochs=1, tau=0.5))
    key = jax.random.key(config.seed)
    cls = jnp.asarray(classes)
    while state.epochs_done < config.epochs:
        e = state.epochs_done
        t0 = time.perf_counter()
        idx, weight = balanced_epoch(jax.random.fold_in(key, e), labels, classes, config.batch_size)
        opt_state = jax.tree.unflatten(treedef, [jnp.asarray(v) for v in state.opt_leaves])
        g, opt_state, snap_loss, train_loss = run(jnp.asarray(state.gates), opt_state, images, logits,
                                                  jnp.asarray(idx), jnp.asarray(weight, images.dtype), cls)
        g = np.asarray(g)
        state = _State(e + 1, g, [np.asarray(v) for v in jax.tree.leaves(opt_state)],
                       state.snapshot_gates + [g], state.snapshot_loss + [np.asarray(snap_loss)],
                       state.snapshot_sparsity + [np.mean(g > 0, -1)], state.train_loss + [np.asarray(train_loss)])
        if log:
            log(f"subnet epoch {e + 1}/{config.epochs}: {idx.shape[1]} steps of {k}x{config.batch_size} "
                f"images in {time.perf_counter() - t0:.1f}s; sparsity mean {state.snapshot_sparsity[-1].mean():.4f}, "
                f"loss mean {float(np.mean(snap_loss)):.4f}")
        if on_epoch:
            on_epoch(state)
    return _result(state, classes, config)


def _result(state: _State, classes, config: SubnetConfig) -> Subnets:
    loss, sparsity = np.stack(state.snapshot_loss), np.stack(state.snapshot_sparsity)
    sel, fallback = (np.asarray(a) for a in select_snapshot(loss, sparsity, config.tau))
    snaps = np.stack(state.snapshot_gates)
    k = np.arange(len(classes))
    return Subnets(gates=snaps[sel, k], sparsity=sparsity[sel, k], selected_epoch=(sel + 1).astype(np.int32),
                   fallback=fallback, classes=np.asarray(classes, np.int32), snapshot_gates=snaps,
                   snapshot_loss=loss, snapshot_sparsity=sparsity, train_loss=np.stack(state.train_loss))


# --------------------------------------------------------------------------- resumable output folder
def _save_state(out: Path, state: _State) -> None:
    arrays = {"epochs_done": np.int64(state.epochs_done), "gates": state.gates,
              "snapshot_gates": np.stack(state.snapshot_gates), "snapshot_loss": np.stack(state.snapshot_loss),
              "snapshot_sparsity": np.stack(state.snapshot_sparsity), "train_loss": np.stack(state.train_loss)}
    arrays.update({f"opt_{i}": v for i, v in enumerate(state.opt_leaves)})
    atomic_save_npz(out / STATE, **arrays)


def _load_state(out: Path) -> _State | None:
    if not (out / STATE).exists():
        return None
    with np.load(out / STATE) as z:
        n_opt = sum(1 for name in z.files if name.startswith("opt_"))
        return _State(int(z["epochs_done"]), z["gates"], [z[f"opt_{i}"] for i in range(n_opt)],
                      list(z["snapshot_gates"]), list(z["snapshot_loss"]), list(z["snapshot_sparsity"]),
                      list(z["train_loss"]))


def distill_to_dir(model, dataset, out: str | os.PathLike, *, config: SubnetConfig = SubnetConfig(),
                   classes=None, source: Mapping[str, Any] | None = None,
                   log: Callable[[str], Any] | None = None,
                   on_epoch: Callable[[_State], Any] | None = None) -> Subnets:
    """:func:`distill_subnets` over a ``Dataset``, resumable per epoch, into the folder ``out``::

        manifest.json   the job (model, gate layout, data ``source``, config, classes), progress
        state.npz       gates, Adam state and snapshots after the last finished epoch
        subnets.npz     the result: gates (K, D), sparsity, selected_epoch, fallback, classes,
                        and every epoch's snapshot_gates / snapshot_loss / snapshot_sparsity / train_loss

    Started again with the same arguments it continues after the last saved
    epoch, with output identical to an uninterrupted run, or returns the saved
    result once finished (``state.npz`` is then removed: ``subnets.npz`` holds
    everything it did but the optimiser state); a folder written with other
    arguments is refused.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = _check_classes(np.arange(model.num_classes) if classes is None else classes, model.num_classes)
    job = {"model": model.name, "gate_placement": model.gate_placement, "cdrp_size": model.spec.size,
           **dict(source or {}), "config": dataclasses.asdict(config), "classes": classes.tolist(),
           "num_train": int(len(dataset.labels))}
    job = json.loads(json.dumps(job))
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("format") != FORMAT or old.get("job") != job:
            old_job = old.get("job") or {}
            diff = {k: (old_job.get(k), v) for k, v in job.items() if old_job.get(k) != v}
            raise ValueError(f"{out} holds subnetworks of other arguments {diff}; use another --out folder")
        if old.get("finished") and (out / SUBNETS).is_file():
            return load_subnets(out)
    class_names = [str(c) for c in (dataset.class_names or ())]
    manifest = {"format": FORMAT, "job": job, "layout": model.spec.layout(), "class_names": class_names,
                "epochs_done": 0, "finished": False}
    state = _load_state(out)
    if state is not None:
        manifest["epochs_done"] = state.epochs_done
        if log:
            log(f"resuming {out} after epoch {state.epochs_done}/{config.epochs}")
    atomic_write_json(path, manifest)

    def save(s: _State):
        _save_state(out, s)  # the state first: the manifest only reports it
        atomic_write_json(path, {**manifest, "epochs_done": s.epochs_done})
        if on_epoch:
            on_epoch(s)

    ds = dataset.materialize()
    res = distill_subnets(model, ds.images, ds.labels, config=config, classes=classes, state=state,
                          on_epoch=save, log=log)
    atomic_save_npz(out / SUBNETS, **res._asdict())
    atomic_write_json(path, {**manifest, "epochs_done": config.epochs, "finished": True,
                             "selected_epoch": res.selected_epoch, "sparsity": res.sparsity,
                             "fallback": res.fallback})
    (out / STATE).unlink(missing_ok=True)   # the manifest says finished first: a kill here loses nothing
    return res


def load_subnets(path: str | os.PathLike, model=None) -> Subnets:
    """Read ``subnets.npz`` (a folder written by :func:`distill_to_dir`, or the file itself).

    With ``model`` given, refuse subnetworks of another model (gate count,
    layout or class count differ) with a one-line ValueError.
    """
    path = Path(path)
    f = path / SUBNETS if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"no {SUBNETS} in {path} (run `jaxroute subnet` first, or wait for it to finish)")
    with np.load(f) as z:
        missing = [n for n in Subnets._fields if n not in z.files]
        if missing:
            raise ValueError(f"{f} is not a subnetwork file (missing {missing})")
        res = Subnets(**{n: z[n] for n in Subnets._fields})
    if model is not None:
        check_subnets(res, model, str(f))
        manifest = f.parent / MANIFEST
        if manifest.is_file():
            m = json.loads(manifest.read_text())
            layout = m.get("layout")
            if layout is not None and layout != json.loads(json.dumps(model.spec.layout())):
                raise ValueError(f"{f} was distilled from a model with another gate layout "
                                 f"({m.get('job', {}).get('model')}), not {model.name}")
    return res


def check_subnets(subnets: Subnets, model, where: str = "the subnetworks") -> None:
    """Refuse subnetworks of another model (gate count or class count differ) with a one-line ValueError."""
    gates, classes = np.asarray(subnets.gates), np.asarray(subnets.classes)
    d = model.spec.size
    if gates.ndim != 2 or gates.shape[1] != d:
        raise ValueError(f"{where} holds gates of shape {gates.shape}; model {model.name} "
                         f"({model.gate_placement} gates) has {d} gates per subnetwork")
    if classes.max(initial=-1) >= model.num_classes:
        raise ValueError(f"{where} holds subnetworks of class {int(classes.max())}; model {model.name} "
                         f"has {model.num_classes} classes")


def class_gates(subnets, model) -> np.ndarray:
    """One gate vector per class of ``model``, (K, D) float32, row c = class c's subnetwork.

    ``subnets``: a ``jaxroute subnet`` output folder or its ``subnets.npz``
    (:func:`load_subnets`, which refuses subnetworks of another model), a
    :class:`Subnets`, or the (K, D) array itself.  Every class needs a
    subnetwork and every gate must be finite.
    """
    if not isinstance(subnets, (str, os.PathLike, Subnets)):
        gates = np.asarray(subnets, np.float32)
        if gates.shape != (model.num_classes, model.spec.size):
            raise ValueError(f"class gates must be ({model.num_classes}, {model.spec.size}) -- one subnetwork per "
                             f"class of {model.name} -- got shape {gates.shape}")
        if not np.isfinite(gates).all():
            raise ValueError("class gates hold non-finite values")
        return gates
    if isinstance(subnets, Subnets):
        where = "the subnetworks"
        check_subnets(subnets, model, where)
        s = subnets
    else:
        where = str(subnets)
        s = load_subnets(subnets, model)
    k = model.num_classes
    missing = sorted(set(range(k)) - {int(c) for c in s.classes})
    if missing:
        raise ValueError(f"{where} has no subnetwork for classes {missing}; every class of {model.name} needs one "
                         f"(all {k})")
    gates = np.zeros((k, model.spec.size), np.float32)
    gates[np.asarray(s.classes, int)] = s.gates
    if not np.all(np.isfinite(gates)):
        raise ValueError(f"the subnetworks in {where} hold non-finite gates")
    return gates


# --------------------------------------------------------------------------- evaluation
def subnet_auc(model, gates, images, labels, *, classes=None, batch_size: int = 128):
    """One-vs-rest AUC of logit c for every class c: (full (K,), subnet (K,)).

    The full network's logit c and the logit c under class c's gates
    ``gates[k]`` score every image; the positives are the images labelled c.
    NaN where a class has no positive or no negative image.
    """
    from sklearn.metrics import roc_auc_score

    from jaxroute.utils.devices import map_batches

    gates = jnp.asarray(gates)
    classes = _check_classes(np.arange(gates.shape[0]) if classes is None else classes, model.num_classes)
    if gates.ndim != 2 or gates.shape != (len(classes), model.spec.size):
        raise ValueError(f"gates must have shape ({len(classes)}, {model.spec.size}), got {tuple(gates.shape)}")
    cls = jnp.asarray(classes)

    @jax.jit
    def scores(x):
        full = model.logits(x)[:, cls]
        sub = jax.vmap(lambda g, c: model.logits(x, g)[:, c], out_axes=1)(gates.astype(x.dtype), cls)
        return full, sub

    full, sub = map_batches(lambda i, x: scores(x), [np.asarray(images)], min(batch_size, len(images)))
    labels = np.asarray(labels)

    def auc(s, c):
        y = labels == c
        return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")

    return (np.array([auc(full[:, k], c) for k, c in enumerate(classes)]),
            np.array([auc(sub[:, k], c) for k, c in enumerate(classes)]))
