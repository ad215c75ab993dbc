"""Stochastic binarization (BinaryConnect): sampling law, deterministic inference, gradient."""

import keras
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
    and under ``jit_compile``: the same law, a fresh sample per call, ``g_x = g``."""
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


def _counter_uniform_reference(n, seed):
    """NumPy transcription of ``kquant.noise``'s formula: ``U[−1, 1)`` for indices ``0..n−1``."""
    def mix(x):
        x = np.atleast_1d(np.asarray(x, np.uint32))   # arrays wrap silently, scalars warn
        x = (x ^ (x >> np.uint32(16))) * np.uint32(0x7FEB352D)
        x = (x ^ (x >> np.uint32(15))) * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    k0, k1 = np.asarray(seed, np.int32).view(np.uint32)
    key = mix(mix(k0) ^ mix(k1 ^ np.uint32(0x9E3779B9)))
    bits = mix(np.arange(n, dtype=np.uint32) ^ key)
    return (bits >> np.uint32(8)).astype(np.float64) * 2.0**-23 - 1.0


COUNTER_BACKENDS = ("tensorflow", "jax")   # torch draws keras.random.uniform (no XLA to fuse)
counter_hash = pytest.mark.skipif(keras.backend.backend() not in COUNTER_BACKENDS,
                                  reason="the counter hash runs on TensorFlow and JAX")


@counter_hash
@pytest.mark.parametrize("mode", ["eager", "graph", "jit"])
def test_noise_is_one_counter_stream_eagerly_in_graphs_and_under_xla(mode):
    """The fused draw is the counter hash of ``kquant.noise`` in every mode: the same
    sample eagerly, in a TensorFlow graph (its halves XLA-compiled) and under
    ``jit_compile`` / ``jax.jit``."""
    backend = keras.backend.backend()
    if mode == "graph" and backend != "tensorflow":
        pytest.skip("graphs are TensorFlow's")
    x = (np.random.default_rng(2).uniform(-1.2, 1.2, size=(64, 33))).astype("float32")
    q = StochasticSign(seed=13)
    q.build(x.shape)
    call = lambda v: q(v, training=True)  # noqa: E731
    if backend == "jax" and mode == "jit":
        import jax

        stateless = lambda v, seed: q.stateless_call([], [seed], v, training=True)  # noqa: E731
        y, _ = jax.jit(stateless)(x, q.non_trainable_variables[0].value)
        y = ops.convert_to_numpy(y)
    elif backend == "tensorflow" and mode != "eager":
        import tensorflow as tf

        y = ops.convert_to_numpy(tf.function(call, jit_compile=mode == "jit")(tf.constant(x)))
    else:
        y = ops.convert_to_numpy(call(x))
    seed = ops.convert_to_numpy(keras.random.SeedGenerator(13).next())
    noise = _counter_uniform_reference(x.size, seed).reshape(x.shape)
    np.testing.assert_array_equal(y, np.where(x + noise.astype("float32") >= 0, 1.0, -1.0))


@counter_hash
def test_counter_noise_is_uniform_and_independent_across_elements_and_steps():
    """24-bit uniforms on ``[−1, 1)``: Kolmogorov–Smirnov against U[−1, 1), no correlation
    between neighbouring elements, between consecutive seeds (the generator's next draw)
    or between seeds differing in their first word; equal to the NumPy transcription."""
    from scipy import stats

    from kquant.noise import counter_uniform

    shape, n = (256, 256), 256 * 256
    draw = lambda seed: ops.convert_to_numpy(  # noqa: E731
        counter_uniform(shape, np.array(seed, "int32"), -1.0, 1.0, "float32")).ravel()
    u = draw([7, 100])
    np.testing.assert_array_equal(u, _counter_uniform_reference(n, [7, 100]).astype("float32"))
    assert u.min() >= -1.0 and u.max() < 1.0
    assert stats.kstest(u, stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-4
    band = 5.0 / np.sqrt(n)   # 5σ for the correlation of independent samples
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < band
    # neighbours jointly uniform: χ² of (u_i, u_i+1) on a 16×16 grid (255 dof)
    pairs, _, _ = np.histogram2d(u[:-1:2], u[1::2], bins=16, range=[[-1, 1], [-1, 1]])
    assert stats.chisquare(pairs.ravel()).pvalue > 1e-4
    for other in ([7, 101], [8, 100], [-7, 100]):
        v = draw(other)
        assert abs(np.corrcoef(u, v)[0, 1]) < band, other
        assert np.mean(u == v) < 1e-3, other
