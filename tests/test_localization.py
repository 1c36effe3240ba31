"""The paste set and weakly supervised localization (box, IoU, α*, energy in box) on known answers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.data.paste import compose, mosaic_grid, paste_set
from jaxroute.explain.localization import (ALPHAS, box_iou, canvas_scores, energy_in_box,
                                           evaluate_localization, evaluate_scores, localization_errors,
                                           threshold_box)


# --------------------------------------------------------------------------- paste set
def test_compose_known_canvas():
    tiles = jnp.stack([jnp.full((2, 3, 1), v, jnp.float32) for v in (1, 2, 3, 4)])
    fg = jnp.full((2, 3, 1), 9.0)
    canvas = jax.jit(compose, static_argnums=3)(fg, tiles, jnp.array([1, 2]), (2, 2))
    want = np.array([[1, 1, 1, 2, 2, 2],
                     [1, 1, 9, 9, 9, 2],
                     [3, 3, 9, 9, 9, 4],
                     [3, 3, 3, 4, 4, 4]], np.float32)
    np.testing.assert_array_equal(canvas[..., 0], want)


@pytest.mark.parametrize("canvas", [48, (64, 40), 16])
def test_canvas_not_divisible_into_the_mosaic_is_refused(canvas):
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="cannot be divided into a mosaic"):
        paste_set(jax.random.key(0), x, np.array([0, 1, 0, 1]), 2, canvas)


def test_mosaic_grid():
    assert mosaic_grid((32, 32), (64, 64)) == (2, 2)
    assert mosaic_grid((32, 32), (32, 96)) == (1, 3)


def test_paste_set_boxes_sources_and_backgrounds():
    rng = np.random.default_rng(0)
    n_img = 60
    x = rng.random((n_img, 4, 4, 2)).astype(np.float32)  # small stand-ins for 32x32 images
    y = np.repeat(np.arange(3), n_img // 3)
    rng.shuffle(y)
    ps = paste_set(jax.random.key(1), x, y, 2000, canvas_size=8)
    assert ps.canvases.shape == (2000, 8, 8, 2) and ps.boxes.shape == (2000, 4)
    np.testing.assert_array_equal(ps.labels, y[ps.source])
    np.testing.assert_array_equal(ps.boxes[:, 2:] - ps.boxes[:, :2], np.full((2000, 2), 4))
    # offsets uniform over [0, 4] in each axis: every value appears, none outside
    for axis in (0, 1):
        counts = np.bincount(ps.boxes[:, axis], minlength=5)
        assert len(counts) == 5 and counts.min() > 300
    # the backgrounds are of other classes, the pasted square is the source image
    assert ps.background.shape == (2000, 4)
    assert np.all(y[ps.background] != ps.labels[:, None])
    for i in range(0, 2000, 97):
        t, l, b, r = ps.boxes[i]
        np.testing.assert_array_equal(ps.canvases[i, t:b, l:r], x[ps.source[i]])
        mosaic = x[ps.background[i]].reshape(2, 2, 4, 4, 2).transpose(0, 2, 1, 3, 4).reshape(8, 8, 2)
        outside = np.ones((8, 8), bool)
        outside[t:b, l:r] = False
        np.testing.assert_array_equal(ps.canvases[i][outside], mosaic[outside])
    # deterministic in the key; every background class other than the label is drawn
    again = paste_set(jax.random.key(1), x, y, 2000, canvas_size=8)
    np.testing.assert_array_equal(again.canvases, ps.canvases)
    other = paste_set(jax.random.key(2), x, y, 20, canvas_size=8)
    assert not np.array_equal(other.boxes, ps.boxes[:20])
    assert set(np.unique(ps.background)) == set(range(n_img))
    # fewer canvases than images: distinct sources
    few = paste_set(jax.random.key(3), x, y, 50, canvas_size=8)
    assert len(set(few.source.tolist())) == 50


# --------------------------------------------------------------------------- boxes and IoU
def test_threshold_box_known_answers():
    m = np.zeros((10, 12), np.float32)
    m[2:5, 3:7] = 1.0
    m[8, 10] = 0.1
    # mean = (12 + 0.1) / 120 = 0.1008...: at alpha = 1 the stray 0.1 is below the threshold
    assert threshold_box(m, 1.0).tolist() == [2, 3, 5, 7]
    assert threshold_box(m, 0.5).tolist() == [2, 3, 9, 11]  # 0.1 >= 0.05: the stray pixel joins
    assert threshold_box(m, 0.0).tolist() == [0, 0, 10, 12]  # every pixel >= 0
    assert threshold_box(m, 1e3).tolist() == [0, 0, 0, 0]  # nothing kept: the empty box
    batch = np.stack([m, m[::-1, ::-1]])
    boxes = jax.jit(threshold_box)(batch, jnp.array([1.0, 1.0]))
    assert boxes.tolist() == [[2, 3, 5, 7], [5, 5, 8, 9]]


def test_box_iou_known_answers():
    assert float(box_iou(jnp.array([0, 0, 2, 2]), jnp.array([1, 1, 3, 3]))) == pytest.approx(1 / 7)
    assert float(box_iou(jnp.array([0, 0, 2, 2]), jnp.array([0, 0, 2, 2]))) == 1.0
    assert float(box_iou(jnp.array([0, 0, 2, 2]), jnp.array([2, 2, 4, 4]))) == 0.0
    assert float(box_iou(jnp.array([0, 0, 0, 0]), jnp.array([0, 0, 0, 0]))) == 0.0
    assert float(box_iou(jnp.array([0, 0, 32, 32]), jnp.array([0, 0, 64, 64]))) == 0.25


def test_energy_in_box_known_answers():
    m = np.zeros((2, 4, 4), np.float32)
    m[0, 1:3, 1:3] = 1.0
    m[0, 0, 0] = 4.0
    boxes = np.array([[1, 1, 3, 3], [0, 0, 4, 4]])
    np.testing.assert_allclose(energy_in_box(m, boxes), [0.5, 0.0])  # an all-zero map has no energy


def synthetic_maps(key, n: int, contrast: float):
    """64x64 maps: value 1 on a random 32x32 box, ``contrast`` elsewhere, plus a little noise."""
    k1, k2 = jax.random.split(key)
    off = np.asarray(jax.random.randint(k1, (n, 2), 0, 33))
    boxes = np.concatenate([off, off + 32], 1)
    maps = np.full((n, 64, 64), contrast, np.float32)
    for i, (t, l, b, r) in enumerate(boxes):
        maps[i, t:b, l:r] = 1.0
    maps += 0.01 * np.asarray(jax.random.uniform(k2, maps.shape))
    return maps, boxes


def test_alpha_search_and_errors_known_answers():
    # mean = (1024 + 3072 * 0.3) / 4096 ~ 0.475: alpha <= 0.5 keeps the whole canvas (IoU 0.25, error),
    # alpha in [1, 2] keeps exactly the box (IoU 1), alpha >= 2.5 keeps nothing (error)
    maps, boxes = synthetic_maps(jax.random.key(0), 40, 0.3)
    scores = canvas_scores(maps, boxes)
    rates = np.mean(np.asarray(scores["errors"]), axis=0)
    assert len(rates) == len(ALPHAS) == 21 and ALPHAS[0] == 0 and ALPHAS[-1] == 10
    np.testing.assert_array_equal(rates[:2], 1.0)
    np.testing.assert_array_equal(rates[2:5], 0.0)
    np.testing.assert_array_equal(rates[5:], 1.0)
    res = evaluate_scores(scores, scores)
    assert res["alpha_star"] == 1.0 and res["train_err"] == 0.0  # ties go to the smallest alpha
    assert not np.any(localization_errors(maps, boxes, 1.5))
    shift = np.where(boxes[:, 1] <= 16, 16, -16)[:, None] * np.array([0, 1, 0, 1])
    assert np.all(localization_errors(maps, boxes + shift, 1.0))  # half-overlapping boxes: IoU 1/3 < 0.5
    test_maps, test_boxes = synthetic_maps(jax.random.key(1), 30, 0.3)
    res = evaluate_localization(maps, boxes, test_maps, test_boxes)
    assert res["alpha_star"] == 1.0 and res["err"] == 0.0 and res["train_err"] == 0.0
    assert res["energy_in_box"] == pytest.approx(1024 / (1024 + 3072 * 0.3), abs=0.01)
    with pytest.raises(ValueError, match="boxes must have shape"):
        evaluate_localization(maps, boxes[:3], test_maps, test_boxes)
