"""Weakly supervised localization from saliency maps (Fong & Vedaldi, ICCV 2017, section 4.1),
the protocol of Table 1 of Wang et al. (arXiv:1910.02673).

For a map m (H, W) and a threshold factor α: the pixels with m >= α·mean(m)
are kept and the predicted box is the tightest box around them.  A map is
counted as a localization *error* when the IoU of that box with the true box is
below 0.5.  α is tuned on training images: α* is the value of the grid
{0, 0.5, ..., 10} with the lowest error rate there (ties: the smallest α), and
the error is then measured on test images with α*.

The maps are non-negative importance maps, one per image (the ``maps`` of the
saliency methods: max over channels of |attribution|, Grad-CAM after its ReLU).
Energy in box is the fraction of a map's total mass inside the true box.

Boxes are integer pixel coordinates ``(top, left, bottom, right)``, half-open:
rows ``top..bottom-1`` and columns ``left..right-1``; an empty box (no pixel
kept) is all zeros with area 0 and IoU 0 with anything.  Every function here is
pure jnp and jittable, batched over leading axes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ALPHAS = tuple(0.5 * i for i in range(21))  # Fong & Vedaldi's grid {0, 0.5, ..., 10}
IOU_THRESHOLD = 0.5


def threshold_box(maps: jax.Array, alpha) -> jax.Array:
    """Tight box around the pixels >= ``alpha``·mean of each map: (..., H, W) -> (..., 4) int32."""
    maps = jnp.asarray(maps)
    h, w = maps.shape[-2:]
    keep = maps >= jnp.asarray(alpha, maps.dtype)[..., None, None] * jnp.mean(maps, axis=(-2, -1), keepdims=True)
    rows, cols = jnp.any(keep, axis=-1), jnp.any(keep, axis=-2)
    top = jnp.argmax(rows, axis=-1)
    bottom = h - jnp.argmax(rows[..., ::-1], axis=-1)
    left = jnp.argmax(cols, axis=-1)
    right = w - jnp.argmax(cols[..., ::-1], axis=-1)
    box = jnp.stack([top, left, bottom, right], axis=-1).astype(jnp.int32)
    return jnp.where(jnp.any(rows, axis=-1)[..., None], box, 0)


def box_area(boxes: jax.Array) -> jax.Array:
    boxes = jnp.asarray(boxes)
    return (jnp.maximum(boxes[..., 2] - boxes[..., 0], 0) * jnp.maximum(boxes[..., 3] - boxes[..., 1], 0))


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union of half-open integer boxes (..., 4); 0 when the union is empty."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    inter = (jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
             * jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0))
    union = box_area(a) + box_area(b) - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


def localization_errors(maps: jax.Array, boxes: jax.Array, alpha) -> jax.Array:
    """Per-image error (bool, IoU < 0.5) of the α-threshold boxes of ``maps`` (N, H, W) vs ``boxes`` (N, 4)."""
    return box_iou(threshold_box(maps, alpha), boxes) < IOU_THRESHOLD


def energy_in_box(maps: jax.Array, boxes: jax.Array) -> jax.Array:
    """Fraction of each map's mass inside its box: (N, H, W), (N, 4) -> (N,); 0 for an all-zero map."""
    maps, boxes = jnp.asarray(maps), jnp.asarray(boxes)
    h, w = maps.shape[-2:]
    r, c = jnp.arange(h), jnp.arange(w)
    inside_r = (r >= boxes[..., 0, None]) & (r < boxes[..., 2, None])
    inside_c = (c >= boxes[..., 1, None]) & (c < boxes[..., 3, None])
    inside = inside_r[..., :, None] & inside_c[..., None, :]
    total = jnp.sum(maps, axis=(-2, -1))
    return jnp.where(total > 0, jnp.sum(jnp.where(inside, maps, 0), axis=(-2, -1)) / jnp.where(total > 0, total, 1),
                     0.0)


def canvas_scores(maps: jax.Array, boxes: jax.Array, alphas=ALPHAS) -> dict[str, jax.Array]:
    """What the protocol needs of each map: ``errors`` (N, A) bool, the error at every α of
    ``alphas``, and ``energy`` (N,), the energy in box.  Scores of parts of a set concatenate to
    the set's (:func:`evaluate_scores`), so a long run can keep them part by part."""
    alphas = jnp.asarray(alphas, jnp.asarray(maps).dtype)
    errors = jax.vmap(lambda a: localization_errors(maps, boxes, a), out_axes=-1)(alphas)
    return {"errors": errors, "energy": energy_in_box(maps, boxes)}


def evaluate_scores(train: dict, test: dict, alphas=ALPHAS) -> dict:
    """The protocol on :func:`canvas_scores`: α* the α with the lowest training error rate (ties:
    the first), then the test error rate (%) at α* and the mean test energy in box.
    Returns ``{alpha_star, err, energy_in_box, train_err}``."""
    alphas = np.asarray(alphas, np.float32)
    rates = np.mean(np.asarray(train["errors"]), axis=0)
    if rates.shape != alphas.shape or np.asarray(test["errors"]).shape[1:] != alphas.shape:
        raise ValueError(f"scores must hold one error per α of the {len(alphas)}-point grid, got training "
                         f"{np.asarray(train['errors']).shape} and test {np.asarray(test['errors']).shape}")
    i = int(np.argmin(rates))
    return {"alpha_star": float(alphas[i]), "err": 100.0 * float(np.mean(np.asarray(test["errors"])[:, i])),
            "energy_in_box": float(np.mean(np.asarray(test["energy"], np.float32))),
            "train_err": 100.0 * float(rates[i])}


def _check(maps, boxes, what: str):
    maps, boxes = np.asarray(maps), np.asarray(boxes)
    if maps.ndim != 3:
        raise ValueError(f"{what} maps must have shape (N, H, W), got {maps.shape}")
    if boxes.shape != (maps.shape[0], 4):
        raise ValueError(f"{what} boxes must have shape ({maps.shape[0]}, 4), got {boxes.shape}")
    return maps, boxes


def evaluate_localization(train_maps, train_boxes, test_maps, test_boxes, alphas=ALPHAS) -> dict:
    """The protocol: α* tuned on the training maps, then on the test maps the error rate (%)
    with α* and the mean energy in box.  Returns ``{alpha_star, err, energy_in_box, train_err}``."""
    train_maps, train_boxes = _check(train_maps, train_boxes, "training")
    test_maps, test_boxes = _check(test_maps, test_boxes, "test")
    scores = jax.jit(canvas_scores)
    return evaluate_scores(scores(train_maps, train_boxes, alphas), scores(test_maps, test_boxes, alphas), alphas)
