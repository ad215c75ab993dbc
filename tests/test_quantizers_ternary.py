"""TWN and BitNet b1.58 ternary quantizers: exact forward and gradient vs the papers' formulas."""

import numpy as np
import pytest
from keras import ops

from kquant.quantizers import TWN, BitNet
from kquant.testing import grad

pytestmark = pytest.mark.core

X = np.random.default_rng(3).normal(size=(5, 4, 6)).astype("float32")
G = np.random.default_rng(4).normal(size=X.shape).astype("float32")


def twn_reference(w, axes):
    delta = np.float32(0.7) * np.mean(np.abs(w), axis=axes, keepdims=True)
    kept = np.abs(w) > delta
    count = np.sum(kept, axis=axes, keepdims=True)
    alpha = np.sum(np.abs(w) * kept, axis=axes, keepdims=True) / count
    return alpha * np.sign(w) * kept, delta, alpha


def bitnet_reference(w, axes, eps=1e-5):
    gamma = np.mean(np.abs(w), axis=axes, keepdims=True)
    return gamma * np.clip(np.round(w / (gamma + np.float32(eps))), -1, 1), gamma


def forward(q, x):
    q.build(x.shape)
    return ops.convert_to_numpy(q(x, training=True))


@pytest.mark.parametrize("per_channel", [False, True])
def test_twn_forward_and_ste_gradient_match_the_paper(per_channel):
    axes = (0, 1) if per_channel else None
    ref, delta, alpha = twn_reference(X, axes)
    q = TWN(per_channel=per_channel)
    y = forward(q, X)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    assert len(np.unique(np.sign(y))) == 3
    # Δ and α are constants of the backward pass: g·α/(2Δ) with the STE
    _, (g,) = grad(lambda w: ops.sum(ops.multiply(q(w, training=True), G)), X)
    np.testing.assert_allclose(g, G * alpha / (2 * delta), rtol=1e-5)


def test_twn_clipped_ste_zeroes_the_gradient_beyond_two_thresholds():
    q = TWN(estimator="clipped_ste")
    _, delta, alpha = twn_reference(X, None)
    forward(q, X)
    _, (g,) = grad(lambda w: ops.sum(ops.multiply(q(w, training=True), G)), X)
    np.testing.assert_allclose(g, G * alpha / (2 * delta) * (np.abs(X) <= 2 * delta), rtol=1e-5)


@pytest.mark.parametrize("per_channel", [False, True])
def test_bitnet_absmean_forward_and_ste_gradient_match_the_paper(per_channel):
    axes = (0, 1) if per_channel else None
    ref, gamma = bitnet_reference(X, axes)
    q = BitNet(per_channel=per_channel)
    np.testing.assert_allclose(forward(q, X), ref, rtol=1e-6)
    _, (g,) = grad(lambda w: ops.sum(ops.multiply(q(w, training=True), G)), X)
    np.testing.assert_allclose(g, G * gamma / (gamma + np.float32(1e-5)), rtol=1e-5)


@pytest.mark.parametrize("q", [TWN(), TWN(per_channel=True), BitNet(), BitNet(per_channel=True)],
                         ids=["twn", "twn_channel", "bitnet", "bitnet_channel"])
def test_ternary_export_is_three_levels_at_two_bits(q):
    y = forward(q, X)
    codes, params = q.encode(X)
    assert q.precision == 2 and set(np.unique(codes)) == {0, 1, 2}
    np.testing.assert_array_equal(ops.convert_to_numpy(q.decode(codes, params)), y)


def test_all_zero_tensor_quantizes_to_zero():
    z = np.zeros((3, 2), "float32")
    for q in (TWN(), BitNet()):
        np.testing.assert_array_equal(forward(q, z), z)
