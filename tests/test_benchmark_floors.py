"""The overhead benchmark's cost floors compute the maps and gradients they name."""

import keras
import numpy as np
import pytest
from keras import ops

from kquant.benchmarks._floors import KINDS, CostFloor
from kquant.testing import grad


def _expected(name, w, c):
    t = np.tanh(w) if name == "tanh" else w
    slope = 1.0 - np.tanh(w) ** 2 if name == "tanh" else np.ones_like(w)
    return np.sum(t * c), c * slope


@pytest.mark.parametrize("name", KINDS)
def test_cost_floor_is_its_map_with_the_exact_gradient(name):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 5)).astype("float32") * 2
    c = rng.normal(size=(6, 5)).astype("float32")
    floor = CostFloor(kind=name)
    floor.build(w.shape)
    weights = ops.convert_to_tensor(c)
    value, (g,) = grad(lambda x: ops.sum(floor(x, training=True) * weights), w)
    want_value, want_g = _expected(name, w, c)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)
    assert [v.name for v in floor.non_trainable_weights] == ["s"] and not floor.trainable_weights


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow graphs")
@pytest.mark.parametrize("name", KINDS)
def test_cost_floor_in_a_training_graph_equals_eager(name):
    """Traced for training outside XLA, the halves run XLA-compiled (as the quantizers')."""
    import tensorflow as tf

    w = np.linspace(-3, 3, 35, dtype="float32").reshape(7, 5)
    c = np.cos(np.arange(35, dtype="float32")).reshape(7, 5)
    floor = CostFloor(kind=name)
    floor.build(w.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(floor(x, training=True) * c)
        return loss, tape.gradient(loss, x)

    value, g = step(tf.constant(w))
    want_value, want_g = _expected(name, w, c)
    np.testing.assert_allclose(value.numpy(), want_value, rtol=1e-5)
    np.testing.assert_allclose(g.numpy(), want_g, rtol=1e-5, atol=1e-6)


def test_cost_floor_names_a_bad_map():
    with pytest.raises(ValueError, match="`kind` must be one of"):
        CostFloor(kind="exp")
