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
