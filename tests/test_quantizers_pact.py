"""PACT: exact forward, ∂/∂x = 1{0 ≤ x ≤ α}, ∂/∂α = 1{x ≥ α}, L2 on α."""

import numpy as np
import pytest
from keras import ops

from kquant.quantizers import PACT
from kquant.testing import grad, variable_grads

pytestmark = pytest.mark.core

X = np.linspace(-1.0, 3.0, 23).astype("float32")
G = np.linspace(0.5, 2.0, 23).astype("float32")


def make(**kwargs):
    q = PACT(bits=3, alpha=2.0, **kwargs)
    q.build(X.shape)
    return q


def test_forward_matches_the_formula():
    q = make()
    n = np.float32(7)
    ref = np.round(np.clip(X, 0, 2.0) * n / np.float32(2.0)) * np.float32(2.0) / n
    np.testing.assert_allclose(ops.convert_to_numpy(q(X, training=True)), ref, rtol=1e-6, atol=1e-7)
    codes, params = q.encode(X)
    assert codes.max() == 7 and codes.min() == 0
    np.testing.assert_array_equal(ops.convert_to_numpy(q.decode(codes, params)),
                                  ops.convert_to_numpy(q(X, training=False)))


def test_input_gradient_is_one_inside_the_clip_range():
    q = make()
    _, (g,) = grad(lambda x: ops.sum(ops.multiply(q(x, training=True), G)), X)
    np.testing.assert_allclose(g, G * ((X >= 0) & (X <= 2.0)), rtol=1e-6)


def test_alpha_gradient_is_the_clip_derivative():
    q = make()
    (g_alpha,) = variable_grads(q, lambda: ops.sum(ops.multiply(q(X, training=True), G)))
    np.testing.assert_allclose(g_alpha, np.sum(G * (X >= 2.0)), rtol=1e-6)


def test_alpha_l2_penalty_is_a_layer_loss():
    q = make(alpha_l2=0.01)
    assert len(q.losses) == 1
    np.testing.assert_allclose(ops.convert_to_numpy(q.losses[0]), 0.01 * 4.0, rtol=1e-6)
    assert not make().losses
