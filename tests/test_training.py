"""Training: the config's checks, a pure train_step, fit on digits, eval_logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxroute.data import Dataset, load_dataset
from jaxroute.training import (
    TrainConfig, augment, create_train_state, eval_logits, fit, topk_accuracy, train_step,
)
from jaxroute.weights import load_model


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def random_digits():
    return load_model("digits_cnn", key=jax.random.key(0))


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", 1.5), ("epochs", True), ("batch_size", 0), ("batch_size", "64"),
    ("lr", 0.0), ("lr", -0.1), ("lr", float("nan")), ("lr", float("inf")), ("momentum", 1.0),
    ("momentum", -0.5), ("weight_decay", -1e-4), ("weight_decay", float("nan")), ("label_smoothing", 1.0),
    ("label_smoothing", -0.1), ("pad_crop", -1), ("pad_crop", 2.0), ("pad_crop", True),
])
def test_train_config_validates(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_accepts_edges():
    c = TrainConfig(epochs=1, batch_size=1, momentum=0.0, weight_decay=0.0, label_smoothing=0.0, pad_crop=0)
    assert (c.epochs, c.batch_size) == (1, 1)
    with pytest.raises(Exception):
        c.lr = 1.0                                                  # frozen: hashable, static under jit


def test_train_step_is_pure(random_digits, digits_train):
    """The same state, batch and key give the same new state and metrics; the input state is untouched."""
    cfg = TrainConfig(batch_size=32, flip=True, pad_crop=1)
    state = create_train_state(random_digits.module, random_digits.variables, cfg, steps_per_epoch=10)
    before = jax.device_get(state.params)
    x, y = digits_train.images[:32], digits_train.labels[:32]
    mask = jnp.ones(32)
    step = jax.jit(train_step, static_argnames="config")
    key = jax.random.key(3)
    s1, m1 = step(state, x, y, mask, key, config=cfg)
    s2, m2 = step(state, x, y, mask, key, config=cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(s1.params), jax.device_get(s2.params))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(s1.batch_stats),
                           jax.device_get(s2.batch_stats))
    assert float(m1["loss"]) == float(m2["loss"]) and float(m1["accuracy"]) == float(m2["accuracy"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    assert int(s1.step) == int(state.step) + 1
    # the step learns: parameters and BN statistics move
    assert not np.allclose(np.asarray(s1.params["conv1"]["kernel"]), before["conv1"]["kernel"])
    assert not np.allclose(np.asarray(s1.batch_stats["bn1"]["mean"]),
                           np.asarray(state.batch_stats["bn1"]["mean"]))
    # another key augments differently, so the step differs
    s3, _ = step(state, x, y, mask, jax.random.key(4), config=cfg)
    assert not np.array_equal(np.asarray(s3.params["conv1"]["kernel"]), np.asarray(s1.params["conv1"]["kernel"]))
    # masked rows do not count in the loss and accuracy (their labels may be anything)
    half = jnp.ones(32).at[16:].set(0.0)
    _, m4 = step(state, x, y, half, key, config=TrainConfig(batch_size=32))
    _, m5 = step(state, x, np.r_[y[:16], (y[16:] + 1) % 10].astype(np.int32), half, key,
                 config=TrainConfig(batch_size=32))
    assert float(m4["loss"]) == float(m5["loss"]) and float(m4["accuracy"]) == float(m5["accuracy"])


def test_augment_flips_and_crops_per_sample():
    x = jnp.arange(4 * 5 * 6 * 1, dtype=jnp.float32).reshape(4, 5, 6, 1)
    np.testing.assert_array_equal(augment(jax.random.key(0), x, False, 0), x)
    flipped = np.asarray(augment(jax.random.key(0), x, True, 0))
    for a, b in zip(flipped, np.asarray(x)):                         # each sample: itself or its mirror image
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    cropped = np.asarray(augment(jax.random.key(1), x, False, 2))
    assert cropped.shape == x.shape


def test_fit_improves_accuracy_on_digits(random_digits, digits_train, digits_test):
    def accuracy(model):
        return topk_accuracy(eval_logits(model, digits_test), digits_test.labels, ks=(1,))["top1"]

    before = accuracy(random_digits)
    variables = fit(random_digits, digits_train, TrainConfig(epochs=2, batch_size=64, seed=0), progress=False)
    assert set(variables) == {"params", "batch_stats"}
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(np.shape(a), np.shape(b)), variables,
                           random_digits.variables)
    trained = random_digits.with_variables(variables)
    after = accuracy(trained)
    assert before < 0.3 and after > 0.9, (before, after)
    # the model it started from is unchanged
    assert accuracy(random_digits) == before
    empty = Dataset(digits_train.images[:0], digits_train.labels[:0], digits_train.class_names)
    with pytest.raises(ValueError, match="empty"):
        fit(random_digits, empty, TrainConfig(epochs=1), progress=False)


def test_fit_is_reproducible_and_logs(random_digits, digits_train):
    small = digits_train.take(96)
    lines = []
    a = fit(random_digits, small, TrainConfig(epochs=2, batch_size=32, seed=1), progress=False, log=lines.append)
    b = fit(random_digits, small, TrainConfig(epochs=2, batch_size=32, seed=1), progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss")


def test_eval_logits_shape_and_values(random_digits, digits_test):
    logits = eval_logits(random_digits, digits_test, batch_size=64)   # 64 does not divide 360
    assert logits.shape == (360, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits[:64], np.asarray(random_digits.logits(digits_test.images[:64])), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(logits[-8:], np.asarray(random_digits.logits(digits_test.images[-8:])), rtol=1e-5,
                               atol=1e-5)
    one = eval_logits(random_digits, Dataset(digits_test.images[:1], digits_test.labels[:1], digits_test.class_names))
    assert one.shape == (1, 10)


def test_topk_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, np.array([2, 0, 0]), ks=(1, 2, 3))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top3": 1.0}
