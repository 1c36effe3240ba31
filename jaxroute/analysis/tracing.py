"""Which neurons a prediction rests on: Dong et al.'s prediction difference (PD) tracing.

arXiv:1708.05493, Eq. 12: for the features φ at one layer and the network's
class probabilities g,

    PD(φᵢ) = ‖g(φ) − g(φ∖ᵢ)‖²_C = (g(φ) − g(φ∖ᵢ))ᵀ C (g(φ) − g(φ∖ᵢ)),

φ∖ᵢ being φ with neuron (channel) i set to 0 and C the WordNet class
correlation (:func:`jaxroute.analysis.wordnet.correlation_matrix`).  A large
PD marks a neuron the decision depends on; the paper shows the top-2 neurons of
each image with their own top images (Fig. 10) and gives no threshold.

:func:`prediction_difference` zeroes each channel with a gate at that point
(``vmap`` over the channels, one forward pass each): it works at any gate point
of any model.  For the last gate point of a network whose head is global
average pooling and one linear layer (the CIFAR ResNets, the digits CNN) the
removal is exact in closed form, logits∖ᵢ = logits − φ̄ᵢ Wᵢ
(:func:`prediction_difference_linear_head`), which costs no forward pass.
C is positive semidefinite, so PD ≥ 0, and a channel that is 0 on an image
has PD 0 there.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _c_norm(d: jax.Array, corr: jax.Array) -> jax.Array:
    return jnp.einsum("...k,kl,...l->...", d, corr, d)


def _check_corr(corr, k):
    corr = jnp.asarray(corr)
    if corr.shape != (k, k):
        raise ValueError(f"the class correlation must be ({k}, {k}) for {k} classes, got {corr.shape}")
    return corr


def prediction_difference(model, x: jax.Array, point: str, corr, *, chunk: int | None = None) -> jax.Array:
    """(B, C) PD of every channel of gate point ``point`` on every image of ``x``, by gating it to 0.

    ``chunk`` channels are removed per vmapped pass (default all at once; a
    smaller value bounds memory at C forward passes per image).
    """
    model.spec.check_points(point)
    c = dict(model.spec)[point]
    corr = _check_corr(corr, model.num_classes)
    p0 = jax.nn.softmax(model.logits(x), axis=-1)
    chunk = c if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    def without(i):
        gate = jnp.ones((c,), x.dtype).at[i].set(0.0)

        def gates(name, act):  # every other gate point stays open
            return gate if name == point else jnp.ones((act.shape[-1],), act.dtype)

        return _c_norm(p0 - jax.nn.softmax(model.logits(x, gates), axis=-1), corr.astype(p0.dtype))

    cols = [jax.vmap(without)(jnp.arange(s, min(s + chunk, c))) for s in range(0, c, chunk)]
    return jnp.concatenate(cols, axis=0).T


def prediction_difference_linear_head(features: jax.Array, kernel: jax.Array, logits: jax.Array,
                                      corr) -> jax.Array:
    """(B, F) PD of every pooled feature when the head is ``logits = features @ kernel + bias``.

    Zeroing channel i of the last gate point zeroes pooled feature i (average
    pooling is linear), so logits∖ᵢ = logits − features[:, i] · kernel[i].
    """
    features, kernel, logits = jnp.asarray(features), jnp.asarray(kernel), jnp.asarray(logits)
    if kernel.shape != (features.shape[-1], logits.shape[-1]):
        raise ValueError(f"kernel must be ({features.shape[-1]}, {logits.shape[-1]}) for these features and "
                         f"logits, got {kernel.shape}")
    corr = _check_corr(corr, logits.shape[-1]).astype(logits.dtype)
    p0 = jax.nn.softmax(logits, axis=-1)
    removed = logits[:, None, :] - features[:, :, None] * kernel[None]   # (B, F, K)
    return _c_norm(p0[:, None, :] - jax.nn.softmax(removed, axis=-1), corr)


def linear_head_kernel(model) -> jax.Array:
    """The (F, K) kernel of a model's final linear layer ``linear`` (CIFAR ResNets, digits CNN)."""
    try:
        return model.variables["params"]["linear"]["kernel"]
    except (KeyError, TypeError):
        raise ValueError(f"{model.name} has no final linear layer named 'linear'; use the gate-based "
                         "prediction_difference") from None


def top_neurons(pd: jax.Array, top: int = 2, threshold: float | None = None):
    """Per image the ``top`` channels by PD (B, top) and, with a ``threshold``, whether each clears it."""
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= pd.shape[-1]:
        raise ValueError(f"top must be an integer in [1, {pd.shape[-1]}], got {top!r}")
    if threshold is not None and not math.isfinite(threshold):  # NaN would silently keep nothing
        raise ValueError(f"threshold must be a finite PD, got {threshold!r}")
    vals, idx = jax.lax.top_k(pd, top)
    keep = jnp.ones_like(vals, bool) if threshold is None else vals >= threshold
    return idx, vals, keep


def trace_dataset(model, images, point: str, corr, *, top: int = 2, threshold: float | None = None,
                  batch_size: int = 64) -> dict:
    """PD of every channel at ``point`` for each of ``images`` and each image's ``top`` channels.

    Returns numpy arrays ``pd`` (N, C), ``top`` (N, top), ``top_pd`` and ``keep``
    (PD >= ``threshold``; all True without one), computed in fixed-shape batches.
    """
    import numpy as np

    from jaxroute.utils.devices import map_batches

    corr = jnp.asarray(corr, jnp.float32)

    @jax.jit
    def one(x):
        pd = prediction_difference(model, x, point, corr)
        idx, vals, keep = top_neurons(pd, top, threshold)
        return {"pd": pd, "top": idx, "top_pd": vals, "keep": keep}

    images = np.asarray(images, np.float32)
    return map_batches(lambda i, x: one(x), (images,), min(batch_size, len(images)))
