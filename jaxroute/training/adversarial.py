"""Adversarial training with feature-consistency and domain-alignment terms: one step, two objectives.

**Dong et al.** (arXiv:1708.05493, Eqs. 8-11, ``objective="dong"``, the
default).  The loss of one batch (x, y) is

    α · CE(y, f(x)) + (1 − α) · CE(y, f(G(x))) + β · ‖φ(x) − φ(G(x))‖²₂        (Eq. 8)

with G(x) the targeted iterative sign attack of the *current* model (Eq. 10):
T steps x_t = clip(x_{t−1} − ε · sign ∇ CE(y*, f(x_{t−1}))), i.e. the library's
:func:`jaxroute.attacks.bim` with ``alpha=None`` (step ε, no ε-ball).  No
gradient flows through G: the adversarial images are constants of the step,
and the gradient of the consistency term flows through both φ(x) and φ(G).

Defaults are the paper's α = 0.5, β = 0.1, T = 10.  The paper gives neither
ε, the choice of y*, nor the schedule; the defaults here are choices, stated
so: ε = 1/255 per step (Kurakin et al.'s α = 1 on [0, 255] pixels, the
paper's reference [14]), y* = the least likely class of the current model on
the clean image (``target="random"``: a uniformly random class other than y),
SGD with momentum 0.9 and weight decay 5e-5 (the paper's Appendix A solver),
lr 0.01 with cosine decay, 5 epochs, batch 100.  The SGD step is the library
trainer's (:func:`jaxroute.training.create_train_state`: Nesterov momentum),
after clipping the gradient to global norm 1 (``grad_clip``): on the
pretrained CIFAR ResNet-20 the first batch has an adversarial CE near 25 and a
consistency term near 70, and one unclipped lr-0.01 step takes clean accuracy
from 0.82 to 0.12 on the next batch.

**Xie et al.** (network dissection under attack, the proposed adversarial
training, ``objective="xie"``; the paper never ran it).  The adversarial batch
is untargeted FGSM on the current model's *predicted* labels (Eq. 10,
:func:`jaxroute.attacks.fgsm` with ``label=None``), ε = ``eps`` = 0.0112 in
[0, 1] pixels (the paper's code: cleverhans FGM ε = 0.05 on ImageNet-normalised
input ≈ 0.05 · 0.224; clipped to [0, 1] here, unclipped there).  The loss is

    CE(y, f(x)) + CE(y, f(x_adv)) + λ_con · ‖φ̃(x) − φ̃(x_adv)‖²₂            (Eq. 7)
        + λ_coral · (1/k²) ‖C(φ̃(x)) − C(φ̃(x_adv))‖₁                          (Eq. 8)
        + λ_mmd · (1/k) ‖mean φ̃(x) − mean φ̃(x_adv)‖₁                          (Eq. 9)

with φ̃ = A(φ) the last feature layer (the penultimate features, k values)
behind an *adaptation layer* A = Dense(k) (from ATDA, Song et al. 2019),
initialised to the identity (kernel I, bias 0) and trained with the network.
A sits *in* the forward path, between φ and the classifier, so the
cross-entropies train it too (a side branch read only by the alignment terms
could shrink to zero and make them vanish); the exported model folds it into
the final linear layer (both are affine, so the fold is exact up to float
rounding), keeping the architecture every other command loads.  Options:
``coral_norm="fro2"`` is Deep CORAL (‖C_S − C_T‖²_F / (4k²)); ``mmd="gaussian"``
the unbiased MMD² with Gaussian kernels at median-heuristic bandwidths
(:mod:`jaxroute.training.domain`).  The paper gives no weights, ε or schedule:
λ_con = λ_coral = λ_mmd = 1/3 are an ATDA reimplementation's weights,
unverified against the paper; the solver, schedule and clipping are Dong's above.

Both objectives share everything else: one jitted ``train_step``; one forward
pass over the clean and the adversarial batch together; every term on the
same features (the consistency term is pluggable: any ``fn(clean, adv) ->
scalar`` of the two (B, ...) feature batches, :func:`squared_l2` by default);
each term (on two-dimensional features also CORAL and MMD, as monitors when
their weight is 0) reported per batch; the batch split over the local devices
when its size divides evenly (the step is one SPMD program, so every
batch-wide statistic is the whole batch's); the resumable driver
:func:`adversarial_fit`.

BatchNorm runs in inference mode with its statistics frozen: the clean and the
adversarial halves of a batch would otherwise share batch statistics, which the
loss does not describe, and fine-tuning keeps the statistics of the network
being explained.

φ is the penultimate features (``feature=None``) or the activation at a gate
point (e.g. ``"layer3.2"``, the last conv block of a CIFAR ResNet); CORAL, MMD
and the adaptation layer need the penultimate features.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxroute.attacks import BIMConfig, FGSMConfig, bim, fgsm
from jaxroute.training import domain
from jaxroute.training.train import TrainConfig, TrainState, create_train_state
from jaxroute.utils.checks import check_int

OBJECTIVES = ("dong", "xie")
TARGETS = ("least_likely", "random")
CORAL_NORMS = ("l1", "fro2")
MMD_KINDS = ("linear", "gaussian")
ADAPTATION = "adaptation"  # the adaptation layer's entry in the train state's params (no model module has it)
# the fields left None take their objective's default
OBJECTIVE_DEFAULTS = {
    "dong": {"beta": 0.1, "lambda_coral": 0.0, "lambda_mmd": 0.0, "adaptation": False},
    "xie": {"beta": 1 / 3, "lambda_coral": 1 / 3, "lambda_mmd": 1 / 3, "adaptation": True},
}
_DONG_GENERATOR = ("alpha", "steps", "step_eps", "target")  # fields only Dong's objective reads
_XIE_FIELDS = ("objective", "eps", "lambda_coral", "lambda_mmd", "coral_norm", "mmd", "adaptation")
Consistency = Callable[[jax.Array, jax.Array], jax.Array]


def squared_l2(clean: jax.Array, adv: jax.Array) -> jax.Array:
    """Eq. 8's (Dong) and Eq. 7's (Xie) term: the batch mean of ‖φ(x) − φ(G(x))‖²₂ (summed over all feature values)."""
    d = (clean - adv).reshape(clean.shape[0], -1)
    return jnp.mean(jnp.sum(d * d, axis=-1))


def _number(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class AdvTrainConfig:
    """Settings of :func:`train_step` / :func:`adversarial_fit` (see the module docstring).

    ``beta``, ``lambda_coral``, ``lambda_mmd`` and ``adaptation`` left None take
    the objective's default (:data:`OBJECTIVE_DEFAULTS`): Dong β = 0.1, no CORAL,
    MMD or adaptation layer; Xie 1/3 each and the adaptation layer.
    """

    objective: str = "dong"       # dong: targeted BIM, α-weighted CEs | xie: FGSM on predictions, CE + CE_adv
    alpha: float = 0.5            # dong: weight of the clean cross-entropy (paper)
    beta: float | None = None     # weight of ‖φ(x) − φ(x_adv)‖² (Dong's β, Xie's λ_con)
    steps: int = 10               # dong: T, attack steps (paper)
    step_eps: float = 1 / 255     # dong: ε per attack step in [0, 1] pixels (choice)
    target: str = "least_likely"  # dong: y*, least_likely | random (choice)
    eps: float = 0.0112           # xie: the FGSM ε in [0, 1] pixels (the paper's code's budget)
    lambda_coral: float | None = None
    lambda_mmd: float | None = None
    coral_norm: str = "l1"        # l1: Xie's Eq. 8 | fro2: Deep CORAL
    mmd: str = "linear"           # linear: Xie's Eq. 9 | gaussian: unbiased MMD², median-heuristic bandwidths
    adaptation: bool | None = None  # the identity-initialised Dense(k) behind φ (ATDA)
    feature: str | None = None    # φ: None = penultimate features, or a gate point name
    epochs: int = 5
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-5
    grad_clip: float | None = 1.0  # global-norm gradient clipping (choice; None: off)
    seed: int = 0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for name, default in OBJECTIVE_DEFAULTS[self.objective].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("alpha", "beta", "lambda_coral", "lambda_mmd", "step_eps", "eps", "lr", "momentum",
                     "weight_decay"):
            _number(getattr(self, name), name)
        if not self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (the weight of the clean loss), got {self.alpha}")
        for name in ("step_eps", "eps"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1] pixel units, got {getattr(self, name)}")
        if not self.lr > 0 or not self.momentum < 1:
            raise ValueError(f"need lr > 0 and momentum < 1, got lr={self.lr}, momentum={self.momentum}")
        for name in ("steps", "epochs", "batch_size"):
            object.__setattr__(self, name, check_int(getattr(self, name), name))   # Python ints for the manifests
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.coral_norm not in CORAL_NORMS:
            raise ValueError(f"coral_norm must be one of {CORAL_NORMS}, got {self.coral_norm!r}")
        if self.mmd not in MMD_KINDS:
            raise ValueError(f"mmd must be one of {MMD_KINDS}, got {self.mmd!r}")
        if not isinstance(self.adaptation, bool):
            raise ValueError(f"adaptation must be True or False, got {self.adaptation!r}")
        if self.feature is not None and (self.adaptation or self.lambda_coral or self.lambda_mmd):
            raise ValueError(f"CORAL, MMD and the adaptation layer act on the penultimate features (feature=None), "
                             f"got feature={self.feature!r}")
        if (self.lambda_coral or (self.lambda_mmd and self.mmd == "gaussian")) and self.batch_size < 2:
            raise ValueError(f"CORAL and the Gaussian MMD need batch_size >= 2, got {self.batch_size}")
        if self.grad_clip is not None and (isinstance(self.grad_clip, bool) or not isinstance(self.grad_clip, (int, float))
                                           or not math.isfinite(self.grad_clip) or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got {self.grad_clip!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, seed=self.seed)

    def identity(self) -> dict:
        """The settings that determine a run (what a resumed run must match).

        Dong's run records Dong's settings, and Xie's fields only where they
        differ from Dong's defaults (``eps`` is not read by Dong's objective);
        Xie's run records every field but Dong's attack and ``alpha``.
        """
        d = dataclasses.asdict(self)
        if self.objective == "dong":
            base = dataclasses.asdict(AdvTrainConfig())
            return {k: v for k, v in d.items() if k not in _XIE_FIELDS or (k != "eps" and v != base[k])}
        return {k: v for k, v in d.items() if k not in _DONG_GENERATOR}

    def weights(self) -> tuple[float, float]:
        """The weights of the clean and the adversarial cross-entropy."""
        return (self.alpha, 1 - self.alpha) if self.objective == "dong" else (1.0, 1.0)


# --------------------------------------------------------------------------- the model with its adaptation layer
def head_name(params: Mapping, num_classes: int) -> str:
    """The final linear layer: the one top-level Dense module (kernel (F, K), bias (K,)) with K = num_classes."""
    names = [n for n, p in params.items() if n != ADAPTATION and isinstance(p, Mapping) and set(p) == {"kernel", "bias"}
             and np.ndim(p["kernel"]) == 2 and np.shape(p["kernel"])[1] == num_classes]
    if len(names) != 1:
        raise ValueError(f"cannot tell the final linear layer ({num_classes} outputs) among the model's modules "
                         f"{sorted(params)}: found {names or 'none'}; the adaptation layer needs exactly one")
    return names[0]


def adaptation_init(params: Mapping, num_classes: int) -> dict:
    """The adaptation layer's parameters at the identity: kernel I (k, k), bias 0 (k = the head's input size)."""
    k, _ = np.shape(params[head_name(params, num_classes)]["kernel"])
    dtype = params[head_name(params, num_classes)]["kernel"].dtype
    return {"kernel": jnp.eye(k, dtype=dtype), "bias": jnp.zeros((k,), dtype)}


def export_params(params: Mapping, num_classes: int) -> dict:
    """The model's own params with the adaptation layer folded into the final linear layer:
    head(A φ + a) = φ (A W) + (a W + b)."""
    params = dict(params)
    if ADAPTATION not in params:
        return params
    a = params.pop(ADAPTATION)
    name = head_name(params, num_classes)
    w, b = params[name]["kernel"], params[name]["bias"]
    hi = jax.lax.Precision.HIGHEST
    params[name] = {"kernel": jnp.matmul(a["kernel"], w, precision=hi),
                    "bias": jnp.matmul(a["bias"], w, precision=hi) + b}
    return params


def create_adv_train_state(module, variables, config: AdvTrainConfig, steps_per_epoch: int) -> TrainState:
    """The library trainer's SGD (:func:`create_train_state`), after global-norm gradient clipping;
    with ``config.adaptation`` the params hold the identity adaptation layer under ``"adaptation"``."""
    if config.adaptation:
        params = dict(variables["params"])
        params[ADAPTATION] = adaptation_init(params, module.num_classes)
        variables = {**variables, "params": params}
    state = create_train_state(module, variables, config.train_config(), steps_per_epoch)
    if config.grad_clip is None:
        return state
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), state.tx)
    return TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=tx, batch_stats=state.batch_stats)


def _forward(state: TrainState, params, x, feature):
    """(logits, φ̃): the network's logits and features, behind the adaptation layer when params hold one."""
    own = {k: v for k, v in params.items() if k != ADAPTATION}
    logits, cap = state.apply_fn({"params": own, "batch_stats": state.batch_stats}, x, capture=True)
    if feature is not None:
        if feature not in cap["gates"]:
            raise ValueError(f"unknown feature point {feature!r}; the gate points: {list(cap['gates'])}")
        return logits, cap["gates"][feature]
    feats = cap["features"]
    if ADAPTATION in params:
        a = params[ADAPTATION]
        head = own[head_name(own, logits.shape[-1])]
        feats = feats @ a["kernel"] + a["bias"]
        logits = feats @ head["kernel"] + head["bias"]
    return logits, feats


def adversarial_batch(state: TrainState, x, y, key, config: AdvTrainConfig):
    """The adversarial batch of the current model (a constant: no gradient) and Dong's targets (None for Xie):
    Dong, targeted BIM towards y*; Xie, untargeted FGSM on the model's predictions."""
    params = jax.lax.stop_gradient(state.params)

    def f(z):
        return _forward(state, params, z, config.feature)[0]

    if config.objective == "xie":
        return jax.lax.stop_gradient(fgsm(f, x, config=FGSMConfig(eps=config.eps)).adv), None
    t = choose_targets(f(x), y, config.target, key)
    adv = bim(f, x, label=y, target=t, config=BIMConfig(eps=config.step_eps, steps=config.steps)).adv
    return jax.lax.stop_gradient(adv), t


def choose_targets(logits: jax.Array, labels: jax.Array, how: str, key: jax.Array) -> jax.Array:
    """y*: the least likely class (never y) or a uniformly random class other than y."""
    k = logits.shape[-1]
    if how == "least_likely":
        return jnp.argmin(jnp.where(jax.nn.one_hot(labels, k, dtype=bool), jnp.inf, logits), axis=-1).astype(jnp.int32)
    shift = jax.random.randint(key, labels.shape, 1, k)
    return ((labels + shift) % k).astype(jnp.int32)


def loss_terms(logits, alogits, fx, fa, y, config: AdvTrainConfig, consistency: Consistency = squared_l2) -> dict:
    """Every term of the loss on one batch: ``ce_clean``, ``ce_adv``, ``consistency`` and, on (B, k)
    features with B >= 2, ``coral`` and ``mmd``."""
    k = logits.shape[-1]
    terms = {"ce_clean": optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, k)).mean(),
             "ce_adv": optax.softmax_cross_entropy(alogits, jax.nn.one_hot(y, k)).mean(),
             "consistency": consistency(fx, fa)}
    if fx.ndim == 2 and fx.shape[0] >= 2:
        terms["coral"] = domain.coral(fx, fa, norm=config.coral_norm)
        terms["mmd"] = domain.linear_mmd(fx, fa) if config.mmd == "linear" else domain.gaussian_mmd2(fx, fa)
    return terms


def total_loss(terms: Mapping, config: AdvTrainConfig):
    """w_clean · CE + w_adv · CE_adv + β · consistency + λ_coral · CORAL + λ_mmd · MMD (zero weights add nothing)."""
    w_clean, w_adv = config.weights()
    loss = w_clean * terms["ce_clean"] + w_adv * terms["ce_adv"] + config.beta * terms["consistency"]
    for name, w in (("coral", config.lambda_coral), ("mmd", config.lambda_mmd)):
        if w:
            loss = loss + w * terms[name]
    return loss


def train_step(state: TrainState, batch: dict, key: jax.Array, config: AdvTrainConfig,
               consistency: Consistency = squared_l2):
    """One step of the objective on ``batch = {"image": (B, H, W, C), "label": (B,)}``; returns (state, metrics).

    Pure; ``config`` and ``consistency`` are static under jit.  Metrics: ``loss``,
    every term of :func:`loss_terms`, ``acc_clean`` and ``acc_adv``.
    """
    x, y = batch["image"], batch["label"]
    adv, _ = adversarial_batch(state, x, y, key, config)
    b = x.shape[0]

    def loss_fn(params):
        logits2, f2 = _forward(state, params, jnp.concatenate([x, adv]), config.feature)  # one forward for both
        logits, alogits = logits2[:b], logits2[b:]
        terms = loss_terms(logits, alogits, f2[:b], f2[b:], y, config, consistency)
        loss = total_loss(terms, config)
        return loss, {"loss": loss, **terms,
                      "acc_clean": jnp.mean(jnp.argmax(logits, -1) == y),
                      "acc_adv": jnp.mean(jnp.argmax(alogits, -1) == y)}

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads), metrics


def consistency_of(state: TrainState, x, y, key, config: AdvTrainConfig, consistency: Consistency = squared_l2):
    """The consistency term of the current model on one batch (for monitoring)."""
    adv, _ = adversarial_batch(state, x, y, key, config)
    _, fx = _forward(state, state.params, x, config.feature)
    _, fa = _forward(state, state.params, adv, config.feature)
    return consistency(fx, fa)


# --------------------------------------------------------------------------- driver
STATE_DIR = "train_state"
PROGRESS = "progress.json"


def _epoch_order(n: int, batch: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shuffled indices, wrapped round to whole batches (every batch has the full shape)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = -(-n // batch)
    return np.resize(perm, steps * batch).reshape(steps, batch)


def _save_state(root: Path, state: TrainState, epoch: int, record: dict) -> None:
    import orbax.checkpoint as ocp

    from jaxroute.utils.io import atomic_write_text

    leaves = jax.tree_util.tree_leaves((state.step, state.params, state.batch_stats, state.opt_state))
    path = (root / STATE_DIR / f"epoch_{epoch:04d}").absolute()
    if path.exists():
        import shutil

        shutil.rmtree(path)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, {f"{i:05d}": np.asarray(a) for i, a in enumerate(leaves)})
    ckptr.wait_until_finished()
    atomic_write_text(root / PROGRESS, json.dumps(record, indent=2))  # written last: marks the epoch done


def _restore_state(root: Path, state: TrainState, epoch: int) -> TrainState:
    import orbax.checkpoint as ocp

    tree = (state.step, state.params, state.batch_stats, state.opt_state)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    got = ocp.StandardCheckpointer().restore((root / STATE_DIR / f"epoch_{epoch:04d}").absolute())
    restored = [jnp.asarray(got[f"{i:05d}"], jnp.asarray(a).dtype) for i, a in enumerate(leaves)]
    step, params, batch_stats, opt_state = jax.tree_util.tree_unflatten(treedef, restored)
    return state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state)


def _placement(batch_size: int):
    """(state placement, batch placement): replicated / split on the batch axis over the local devices
    when the batch divides evenly, else the default device for both (None)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxroute.utils.devices import batch_sharding

    if jax.local_device_count() == 1 or batch_size % jax.local_device_count():
        return None, None
    split = batch_sharding()
    return NamedSharding(split.mesh, PartitionSpec()), split


def adversarial_fit(model, train, config: AdvTrainConfig, out, *, consistency: Consistency = squared_l2,
                    source: dict | None = None, log=None) -> dict:
    """Fine-tune a :class:`~jaxroute.models.GatedModel` with ``config``'s objective on ``train``, resumably.

    After every epoch the full train state (with the adaptation layer, if
    any) is saved to ``out/train_state/`` (orbax) and ``out/progress.json``
    records the finished epochs with their mean metrics and seconds; a run
    restarted with the same settings (:meth:`AdvTrainConfig.identity`) and
    ``source`` continues after the last finished epoch (other settings are
    refused).  Batches are the epoch's permutation wrapped round to whole
    batches, so each compiled step has one shape and the order is a function
    of (seed, epoch); each batch is split over the local devices when its size
    divides evenly (the result does not depend on the device count beyond
    float rounding).  Returns ``{"variables": ..., "adaptation": {"kernel",
    "bias"} or None, "epochs": [per-epoch metrics]}``; ``variables`` are the
    model's own, the adaptation layer folded into its final linear layer.
    """
    out = Path(out)
    n = len(train.labels)
    if n == 0:
        raise ValueError("training set is empty")
    steps = -(-n // config.batch_size)
    state = create_adv_train_state(model.module, model.variables, config, steps)
    identity = {"config": config.identity(), "source": source or {}, "n_train": n}
    history: list[dict] = []
    prog = out / PROGRESS
    if prog.is_file():
        rec = json.loads(prog.read_text())
        if rec.get("identity") != json.loads(json.dumps(identity)):
            raise ValueError(f"{out} holds adversarial training with other settings ({rec.get('identity')}); "
                             "use another --out or the same settings")
        history = rec["epochs"]
        if history:
            state = _restore_state(out, state, len(history))
            if log:
                log(f"resuming after epoch {len(history)}/{config.epochs}")
    out.mkdir(parents=True, exist_ok=True)
    replicated, split = _placement(config.batch_size)
    if replicated is not None:
        state = jax.device_put(state, replicated)
    put = (lambda a: jax.device_put(a, split)) if split is not None else jnp.asarray
    step = jax.jit(functools.partial(train_step, config=config, consistency=consistency), donate_argnums=0)
    images, labels = np.asarray(train.images), np.asarray(train.labels)
    for epoch in range(len(history), config.epochs):
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(config.seed), epoch)
        sums: dict[str, float] = {}
        order = _epoch_order(n, config.batch_size, config.seed, epoch)
        for i, idx in enumerate(order):
            state, m = step(state, {"image": put(images[idx]), "label": put(labels[idx])},
                            jax.random.fold_in(key, i))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        history.append({**{k: v / len(order) for k, v in sums.items()}, "seconds": time.perf_counter() - t0})
        _save_state(out, state, epoch + 1, {"identity": identity, "epochs": history})
        if log:
            m = history[-1]
            extra = "".join(f" {k} {m[k]:.4f}" for k in ("coral", "mmd") if k in m)
            log(f"epoch {epoch + 1}/{config.epochs}: loss {m['loss']:.4f} ce {m['ce_clean']:.4f} "
                f"ce_adv {m['ce_adv']:.4f} consistency {m['consistency']:.4f}{extra} acc_adv {m['acc_adv']:.4f} "
                f"({m['seconds']:.1f} s)")
    params = jax.device_get(state.params)
    adaptation = params.get(ADAPTATION)
    variables = {"params": jax.device_get(export_params(params, model.num_classes)),
                 "batch_stats": jax.device_get(state.batch_stats)}
    return {"variables": variables, "adaptation": adaptation, "epochs": history}


# --------------------------------------------------------------------------- evaluation
PGD_STEPS = 10
PGD_STEP_FRACTION = 0.25  # PGD step α = ε/4 (Madry et al.'s CIFAR ratio, 2/255 for ε = 8/255)


def robust_accuracy(model, dataset, eps: float, *, key: jax.Array, batch_size: int = 256) -> dict:
    """Top-1 accuracy of ``model`` on ``dataset`` clean, under FGSM and under PGD, both untargeted on the
    true labels with L∞ budget ``eps`` (in [0, 1] pixels).

    PGD is the library's :func:`jaxroute.attacks.pgd`: L∞, random start,
    ``PGD_STEPS`` = 10 steps of α = ε/4.  One jitted function per fixed-shape
    batch, split over the local devices (:func:`~jaxroute.utils.devices.map_batches`).
    Returns ``clean_top1``, ``clean_top5`` (None under 5 classes), ``fgsm_top1``,
    ``pgd_top1`` and ``pgd`` (its settings).
    """
    from jaxroute.attacks import PGDConfig, pgd
    from jaxroute.training.train import topk_accuracy
    from jaxroute.utils.devices import map_batches

    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] pixel units, got {eps!r}")
    images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
    if len(labels) == 0:
        raise ValueError("the test set is empty")
    fgsm_cfg = FGSMConfig(eps=eps)
    pgd_cfg = PGDConfig(eps=eps, alpha=eps * PGD_STEP_FRACTION, steps=PGD_STEPS)

    @jax.jit
    def one(x, y, k):
        y = y.astype(jnp.int32)
        return {"logits": model.logits(x), "fgsm": fgsm(model.logits, x, label=y, config=fgsm_cfg).adv_pred,
                "pgd": pgd(model.logits, x, label=y, key=k, config=pgd_cfg).adv_pred}

    out = map_batches(lambda i, x, y: one(x, y, jax.random.fold_in(key, i)), (images, labels),
                      min(batch_size, len(labels)))
    acc = topk_accuracy(out["logits"], labels, ks=(1, 5) if model.num_classes >= 5 else (1,))
    return {"clean_top1": acc["top1"], "clean_top5": acc.get("top5"),
            "fgsm_top1": float(np.mean(out["fgsm"] == labels)), "pgd_top1": float(np.mean(out["pgd"] == labels)),
            "pgd": dataclasses.asdict(pgd_cfg)}
