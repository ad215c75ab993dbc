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


@pytest.mark.parametrize("h,w,c,f,ks,strides,padding", [
    (5, 5, 1, 2, (3, 3), (1, 1), "valid"), (6, 7, 3, 5, (3, 3), (1, 1), "same"),
    (8, 8, 7, 4, (3, 3), (2, 2), "same"), (9, 6, 8, 3, (2, 3), (2, 1), "valid"),
    (7, 7, 16, 9, (5, 5), (1, 1), "same"), (6, 6, 64, 2, (1, 1), (1, 1), "same"),
    (5, 6, 65, 3, (3, 3), (1, 1), "same"), (4, 4, 130, 2, (3, 2), (1, 2), "same")])
def test_binary_conv2d_equals_float_reference_exactly(h, w, c, f, ks, strides, padding):
    """C of 1, 3, 7, 8, 16 and 64 (one word, padding bits) and 65, 130 (several words);
    zero padding counts 0, as in the float convolution."""
    rng = np.random.default_rng(h * w * c)
    x = rng.normal(size=(2, h, w, c)).astype("float32")
    kernel = rng.normal(size=ks + (c, f)).astype("float32")
    x[0, 0, 0, 0] = kernel[0, 0, 0, 0] = 0.0  # sign(0) = +1
    sign = lambda v: np.where(v >= 0, 1.0, -1.0).astype("float32")  # noqa: E731
    reference = keras.ops.convert_to_numpy(keras.ops.conv(sign(x), sign(kernel), strides=strides,
                                                          padding=padding))
    got = xnor.binary_conv2d(x, xnor.pack_conv_kernel(kernel), strides, padding)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, reference.astype(np.int32))


def test_binary_conv2d_matches_the_keras_layer():
    layer = kquant.QuantConv2D(6, 3, padding="same", strides=2, kernel_quantizer=kquant.quantizer(
        "bwn", per_channel=True), input_quantizer="sign")
    model = keras.Sequential([keras.Input((9, 9, 5)), layer])
    layer.bias.assign(np.linspace(-1, 1, 6).astype("float32"))
    x = np.random.default_rng(0).normal(size=(3, 9, 9, 5)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(xnor.BinaryConv2D(layer)(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_quantizer"):
        xnor.BinaryConv2D(kquant.QuantConv2D(3, 3, kernel_quantizer="sign"))
