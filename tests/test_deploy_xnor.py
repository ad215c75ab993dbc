"""XNOR + popcount binary kernel: exact integers, and a binary QuantDense run through it."""

import keras
import numpy as np
import pytest

import kquant

pytest.importorskip("numba")
from kquant.deploy import xnor  # noqa: E402

pytestmark = pytest.mark.core


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 63, 5), (4, 64, 3), (7, 65, 9), (2, 130, 17),
                                   (5, 257, 4), (16, 1000, 33)])
def test_binary_matmul_equals_float_reference_exactly(m, k, n):
    rng = np.random.default_rng(k)
    a = rng.normal(size=(m, k)).astype("float32")
    b = rng.normal(size=(n, k)).astype("float32")
    a[0, 0] = 0.0  # sign(0) = +1, as kquant's Sign
    reference = np.where(a >= 0, 1, -1) @ np.where(b >= 0, 1, -1).T
    got = xnor.binary_matmul(xnor.pack_signs(a), xnor.pack_signs(b), k)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, reference)


def test_packed_operands_are_checked():
    with pytest.raises(ValueError, match="ceil"):
        xnor.binary_matmul(np.zeros((2, 2), np.uint64), np.zeros((3, 1), np.uint64), 70)


def test_binary_dense_matches_the_keras_layer():
    layer = kquant.QuantDense(37, kernel_quantizer=kquant.quantizer("bwn", per_channel=True),
                              input_quantizer="sign")
    model = keras.Sequential([keras.Input((100,)), layer])
    x = np.random.default_rng(0).normal(size=(8, 100)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(xnor.BinaryDense(layer)(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_quantizer"):
        xnor.BinaryDense(kquant.QuantDense(3, kernel_quantizer="sign"))
