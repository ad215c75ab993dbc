"""Stochastic binarization (BinaryConnect): sampling law, deterministic inference, gradient."""

import numpy as np
import pytest
from keras import ops

from kquant.quantizers import StochasticSign
from kquant.testing import grad

pytestmark = pytest.mark.core

GRID = np.linspace(-1.5, 1.5, 13).astype("float32")


def test_training_samples_plus_one_with_hard_sigmoid_probability():
    n = 4000
    x = np.tile(GRID, (n, 1))
    q = StochasticSign(seed=7)
    q.build(x.shape)
    y = ops.convert_to_numpy(q(x, training=True))
    assert set(np.unique(y)) <= {-1.0, 1.0}
    p = np.clip((GRID + 1) / 2, 0, 1)
    freq = np.mean(y > 0, axis=0)
    tol = 4 * np.sqrt(p * (1 - p) / n) + 1e-9  # 4σ binomial band; exact 0/1 at saturation
    assert np.all(np.abs(freq - p) <= tol), (freq, p)
    # the seed generator's state advances: a second call draws a new sample
    assert not np.array_equal(ops.convert_to_numpy(q(x, training=True)), y)


def test_inference_is_the_deterministic_sign():
    q = StochasticSign(seed=1)
    q.build(GRID.shape)
    for training in (False, None):
        np.testing.assert_array_equal(ops.convert_to_numpy(q(GRID, training=training)),
                                      np.where(GRID >= 0, 1.0, -1.0))


@pytest.mark.parametrize("estimator, mask", [("ste", lambda x: 1.0),
                                             ("clipped_ste", lambda x: np.abs(x) <= 1)])
def test_gradient_is_the_estimator_at_the_noise_free_input(estimator, mask):
    q = StochasticSign(seed=3, estimator=estimator)
    q.build(GRID.shape)
    g_up = np.arange(1, 14, dtype="float32")
    _, (g,) = grad(lambda x: ops.sum(ops.multiply(q(x, training=True), g_up)), GRID)
    np.testing.assert_array_equal(g, g_up * mask(GRID))


def test_seed_must_be_an_int():
    with pytest.raises(ValueError, match="`seed`"):
        StochasticSign(seed=1.5)


@pytest.mark.tf_only
@pytest.mark.parametrize("jit", [False, True])
def test_sampling_law_and_gradient_in_tensorflow_graphs(jit):
    """In a train-step graph (its halves XLA-compiled, noise drawn inside: ``kquant.noise``)
    and under ``jit_compile`` (ThreeFry): the same law, a fresh sample per call, ``g_x = g``."""
    import tensorflow as tf

    n = 4000
    x = tf.constant(np.tile(GRID, (n, 1)))
    up = tf.constant(np.random.default_rng(0).normal(size=x.shape).astype("float32"))
    q = StochasticSign(seed=5)
    q.build(x.shape)

    @tf.function(jit_compile=jit)
    def step(v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            y = q(v, training=True)
            loss = tf.reduce_sum(y * up)
        return y, tape.gradient(loss, v)

    y, g = (t.numpy() for t in step(x))
    assert set(np.unique(y)) <= {-1.0, 1.0}
    p = np.clip((GRID + 1) / 2, 0, 1)
    freq = np.mean(y > 0, axis=0)
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)
    np.testing.assert_array_equal(g, up.numpy())
    assert not np.array_equal(step(x)[0].numpy(), y)


@pytest.mark.tf_only
def test_training_noise_outside_xla_is_keras_uniform():
    """Outside XLA the fused draw is ``keras.random.uniform``'s (Philox) stream."""
    import keras

    x = np.zeros((64, 32), "float32") + 0.25
    q = StochasticSign(seed=13)
    q.build(x.shape)
    y = ops.convert_to_numpy(q(x, training=True))
    noise = ops.convert_to_numpy(keras.random.uniform(x.shape, -1.0, 1.0,
                                                      seed=keras.random.SeedGenerator(13)))
    np.testing.assert_array_equal(y, np.where(x + noise >= 0, 1.0, -1.0))
