"""Lee et al.'s Mahalanobis detector (NeurIPS 2018), with input pre-processing.

Per layer l (the pooled features of :mod:`jaxroute.detection.features`):
class means μ_c over the training images and one tied covariance Σ (the
covariance of the class-centred features, scikit-learn
``EmpiricalCovariance`` in the reference code ``pokaxpoka/deep_Mahalanobis_detector``),
d_c(f) = (f − μ_c)ᵀ Σ⁻¹ (f − μ_c).  The layer score of an input x is

    x̂ = x − ε · sign ∇ₓ ½ d_ĉ(f_l(x)),   ĉ = argmin_c d_c(f_l(x)),
    M_l(x) = max_c −½ d_c(f_l(x̂)),

with ε in pixel units, ε ∈ {0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005}
(the reference code's list).  The L layer scores at one ε are the features
of a logistic regression (:mod:`jaxroute.detection.protocol`), which also
picks ε on validation data.

As the reference code: the sign is ``+1 where the gradient is >= 0`` (a zero
gradient still moves the pixel), x̂ is not clipped to [0, 1], and the
covariance is not shrunk (``shrinkage="none"``; pass ``"ledoit_wolf"`` when
a layer has more dimensions than samples).  The reference normalises the
input and divides the step by the per-channel std, which is the same step
ε in pixel space; our model normalises internally, so x̂ is formed in pixels.

Computation: per layer, one batched forward/backward gives the gradient for
every sample (the network runs in inference mode, so the gradient of the
summed loss is the stack of per-sample gradients), then one forward pass of
the E perturbed batches (vmapped over ε) scores every ε at once.  The
reference re-runs forward, backward and forward for each (layer, ε) pair.

The class-subnetwork variant of Wang, Hu, Su (arXiv:1910.02673, §5.2,
Eq. 4-5; :class:`SubnetMahalanobisScorer`) reads class c's feature through
class c's subnetwork: d_c(x) = (f_c(x) − μ̂_c)ᵀ Σ̂⁻¹ (f_c(x) − μ̂_c) with
μ̂_c the mean of f_c over class c's training images and Σ̂ the tied
covariance of those class-centred features; the same pre-processing, ε grid
and protocol.  It costs K forward passes per score where the plain
detector costs one (per layer K + 2 + K·E passes against 2 + E, a backward pass
counted as one).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxroute.detection.features import class_gated_features, pool
from jaxroute.detection.gaussian import ClassGaussians, fit_class_gaussians, mahalanobis, paired_mahalanobis
from jaxroute.utils.devices import map_batches

LEE_EPSILONS = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)


@dataclasses.dataclass(frozen=True)
class MahalanobisConfig:
    """Input pre-processing magnitudes (pixels) and the covariance shrinkage; defaults are Lee et al.'s."""

    epsilons: tuple[float, ...] = LEE_EPSILONS
    shrinkage: str = "none"

    def __post_init__(self):
        eps = tuple(self.epsilons)
        if not eps or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0
                          for e in eps):
            raise ValueError(f"Mahalanobis epsilons must be a non-empty list of finite numbers >= 0, got {eps!r}")
        object.__setattr__(self, "epsilons", tuple(float(e) for e in eps))
        if self.shrinkage not in ("none", "ledoit_wolf"):
            raise ValueError(f"Mahalanobis shrinkage must be 'none' or 'ledoit_wolf', got {self.shrinkage!r}")


def fit_layer_gaussians(features: Sequence, labels, num_classes: int, shrinkage: str = "none"
                        ) -> tuple[list[ClassGaussians], list[tuple[int, ...]]]:
    """One tied-covariance class-Gaussian per layer from training features [(N, C_l)] and labels (N,).

    Returns the Gaussians and, per layer, the channels they are fitted on:
    channels constant over the training images (dead ReLUs; two of the
    pretrained CIFAR ResNet-20's sixteen stem channels) are left out.  They
    make the covariance singular; the reference's ``EmpiricalCovariance``
    pseudo-inverse gives them zero precision, so leaving them out gives the
    same distances.
    """
    gs, kept = [], []
    for f in features:
        f = np.asarray(f, np.float64).reshape(len(f), -1)
        keep = tuple(int(c) for c in np.flatnonzero(f.max(0) > f.min(0)))
        if not keep:
            raise ValueError("a layer's features are constant over the training images")
        gs.append(fit_class_gaussians(f[:, keep], labels, num_classes, covariance="tied", shrinkage=shrinkage))
        kept.append(keep)
    return gs, kept


def _preprocessed_scores(x: jax.Array, epsilons: Sequence[float], distances, half_closest,
                         sequential: bool = False) -> jax.Array:
    """max_c −½ d_c(x̂_ε) for every ε, (B, E), with x̂_ε = x − ε · sign ∇ₓ ``half_closest``.

    ``distances(xb)`` -> (B, K) the squared distances d_c; ``half_closest(xb)``
    -> ½ Σ_b d_ĉ(xb) for the closest class ĉ of each sample (the inputs run in
    inference mode, so the gradient of the sum is the stack of per-sample
    gradients).  The E perturbed batches run vmapped, or one after the other
    with ``sequential`` (bounded memory when ``distances`` is itself batched).
    """
    grad = jax.grad(half_closest)(x)
    step = jnp.where(grad >= 0, 1.0, -1.0).astype(x.dtype)   # the reference's sign: +1 where the gradient is >= 0

    def score_at(e):
        return jnp.max(-0.5 * distances(x - e * step), axis=-1)

    eps = jnp.asarray(epsilons, x.dtype)
    return (jax.lax.map(score_at, eps) if sequential else jax.vmap(score_at)(eps)).T


def _channel_index(channels, n: int) -> list:
    channels = [None] * n if channels is None else list(channels)
    return [None if ch is None else np.asarray(ch, np.int32) for ch in channels]


def layer_scores(model, gaussians: Sequence[ClassGaussians], points: Sequence[str], x: jax.Array,
                 epsilons: Sequence[float] = LEE_EPSILONS, gates=None,
                 channels: Sequence[Sequence[int]] | None = None) -> jax.Array:
    """Lee et al.'s scores M_l(x̂_ε) of a batch, (B, L, E) for L layers and E magnitudes.  Pure, jittable
    (``points``/``epsilons``/``channels`` static); ``gates`` gates every pass (e.g. a subnetwork);
    ``channels``: per layer the channels the Gaussians were fitted on (all when None)."""
    if len(gaussians) != len(points):
        raise ValueError(f"{len(gaussians)} fitted layers for {len(points)} gate points")
    out = []
    for g, p, idx in zip(gaussians, points, _channel_index(channels, len(points))):
        def feat(xb, p=p, idx=idx):
            f = pool(model.capture(xb, gates).acts[p])
            return f if idx is None else f[:, idx]

        def distances(xb, g=g, feat=feat):
            return mahalanobis(g, feat(xb))

        def half_min_distance(xb, distances=distances):
            return 0.5 * jnp.sum(jnp.min(distances(xb), axis=-1))   # ½ d_ĉ, ĉ the closest class, summed

        out.append(_preprocessed_scores(x, epsilons, distances, half_min_distance))
    return jnp.stack(out, axis=1)


def subnet_layer_scores(model, gaussians: Sequence[ClassGaussians], points: Sequence[str], x: jax.Array,
                        class_gates, epsilons: Sequence[float] = LEE_EPSILONS,
                        channels: Sequence[Sequence[int]] | None = None) -> jax.Array:
    """Wang et al.'s class-subnetwork scores M_l(x̂_ε) of a batch, (B, L, E).  Pure, jittable.

    ``class_gates``: (K, D) flat gates, row c = class c's subnetwork Λ_c;
    ``gaussians``: per layer μ̂_c and the tied Σ̂ fitted on training features
    f_{y}(x) (each image through its own class's subnetwork).  Per layer,
    with f_c(x) the pooled feature of x through Λ_c and
    d_c(x) = (f_c(x) − μ̂_c)ᵀ Σ̂⁻¹ (f_c(x) − μ̂_c):

        ĉ = argmin_c d_c(x),   x̂ = x − ε · sign ∇ₓ ½ d_ĉ(x),   M_l(x̂) = max_c −½ d_c(x̂).

    The K subnetworks run as one program vmapped over classes
    (:func:`~jaxroute.detection.features.class_gated_features`); the
    gradient takes one pass with each sample under its own ĉ's gates
    (per-sample gates), not K; the E magnitudes run one after the other
    (``lax.map``), each a K-fold batch.  With every Λ_c = 1 this is
    :func:`layer_scores`.
    """
    if len(gaussians) != len(points):
        raise ValueError(f"{len(gaussians)} fitted layers for {len(points)} gate points")
    gates = jnp.asarray(class_gates, x.dtype)
    if gates.ndim != 2 or gates.shape[1] != model.spec.size:
        raise ValueError(f"class gates must be (K, {model.spec.size}), got shape {tuple(gates.shape)}")
    out = []
    for g, p, idx in zip(gaussians, points, _channel_index(channels, len(points))):
        def select(f, idx=idx):
            return f if idx is None else f[..., idx]

        def distances(xb, g=g, p=p, select=select):
            return paired_mahalanobis(g, select(class_gated_features(model, xb, (p,), gates)[0]))   # (B, K)

        closest = jnp.argmin(distances(x), axis=-1)                                        # ĉ per sample

        def half_closest(xb, g=g, p=p, select=select, closest=closest):
            f = select(pool(model.capture(xb, gates[closest]).acts[p]))                    # through Λ_ĉ
            d = mahalanobis(g, f)
            return 0.5 * jnp.sum(jnp.take_along_axis(d, closest[:, None], axis=1))

        out.append(_preprocessed_scores(x, epsilons, distances, half_closest, sequential=True))
    return jnp.stack(out, axis=1)


class MahalanobisScorer:
    """Fit the per-layer Gaussians on training features, then score batches (fit / score shape).

    ``fit(features, labels)`` takes the pooled training features
    [(N, C_l)] of ``points`` (from :func:`~jaxroute.detection.features.feature_fn`);
    ``score(x)`` returns the (N, L, E) layer scores of images ``x`` (higher =
    closer to the training data, i.e. more likely clean).
    """

    def __init__(self, model, points: Sequence[str], config: MahalanobisConfig = MahalanobisConfig(),
                 batch_size: int = 100):
        self.model, self.points, self.config = model, model.spec.check_points(points), config
        self.batch_size = int(batch_size)
        self.gaussians: list[ClassGaussians] | None = None
        # one jitted function for every fit: the Gaussians are arguments, the kept channels static
        self._fn = jax.jit(lambda gs, x, channels: layer_scores(model, gs, self.points, x, config.epsilons,
                                                                 channels=channels), static_argnames="channels")

    def fit(self, features: Sequence, labels) -> "MahalanobisScorer":
        if len(features) != len(self.points):
            raise ValueError(f"got features of {len(features)} layers for {len(self.points)} gate points")
        for f, p, c in zip(features, self.points, self._channels()):
            if np.shape(f)[-1] != c:
                raise ValueError(f"features of {p!r} have {np.shape(f)[-1]} channels, the model has {c}: "
                                 "features of another model?")
        self.gaussians, self.channels = fit_layer_gaussians(features, labels, self.model.num_classes,
                                                            self.config.shrinkage)
        return self

    def _channels(self):
        ch = dict(zip(self.model.spec.names, self.model.spec.channels))
        return [ch[p] for p in self.points]

    def score(self, x) -> np.ndarray:
        if self.gaussians is None:
            raise RuntimeError("fit the Mahalanobis scorer before scoring")
        gs, ch = self.gaussians, tuple(self.channels)
        return map_batches(lambda i, xb: self._fn(gs, xb, channels=ch), (np.asarray(x, np.float32),),
                           min(self.batch_size, len(x)))


class SubnetMahalanobisScorer(MahalanobisScorer):
    """The class-subnetwork Mahalanobis detector of Wang, Hu, Su (arXiv:1910.02673, §5.2, Eq. 4-5).

    ``class_gates`` (K, D): class c's subnetwork Λ_c in row c
    (:func:`jaxroute.routing.subnet.class_gates`).  ``fit(features, labels)``
    takes the pooled training features [(N, C_l)] of each image through its
    *own* class's subnetwork (``feature_fn(..., class_gates=..., by_label=True)``):
    μ̂_c is the mean over class c's images, Σ̂ the tied covariance of the
    class-centred features.  ``score(x)`` returns the (N, L, E) layer scores
    of :func:`subnet_layer_scores`: max over classes c of −½ the distance of
    f_c(x), x through Λ_c, to μ̂_c.

    As the plain detector (:class:`MahalanobisScorer`, Lee et al.'s protocol,
    which the paper follows): one score per feature layer, the factor ½ of
    Lee et al.'s code (Eq. 5 has none; a scale the logistic regression
    absorbs), constant training channels left out, and Lee et al.'s input
    pre-processing with the same ε grid, its gradient that of class ĉ's
    distance through class ĉ's subnetwork, ĉ the closest class.  The paper
    says only "as in Lee et al." for the pre-processing; this is that step
    with each class's feature read through its own subnetwork.
    """

    def __init__(self, model, points: Sequence[str], class_gates, config: MahalanobisConfig = MahalanobisConfig(),
                 batch_size: int = 100):
        super().__init__(model, points, config, batch_size)
        from jaxroute.routing.subnet import class_gates as as_class_gates

        self.class_gates = as_class_gates(class_gates, model)
        fn = jax.jit(lambda gs, cg, x, channels: subnet_layer_scores(model, gs, self.points, x, cg, config.epsilons,
                                                                      channels=channels), static_argnames="channels")
        self._fn = lambda gs, x, channels: fn(gs, self.class_gates, x, channels=channels)


__all__ = ["LEE_EPSILONS", "MahalanobisConfig", "MahalanobisScorer", "SubnetMahalanobisScorer",
           "fit_layer_gaussians", "layer_scores", "subnet_layer_scores"]
