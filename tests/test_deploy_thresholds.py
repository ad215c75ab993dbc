"""BatchNorm folding for deployment: depthwise conv + BN, and BN → integer thresholds
after binary activations (Larq Compute Engine style): the folded model equals the
unfolded one, the thresholds exactly (γ > 0, γ < 0 and γ = 0 channels, ties at 0)."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant import deploy
from kquant.deploy.folding import BinaryThreshold

pytestmark = pytest.mark.core
# JAX runs these many small eager ops one compiled op at a time: the extra cases are slow there
SLOW_ON_JAX = pytest.mark.slow if keras.backend.backend() == "jax" else ()


def _set_bn(bn, channels, rng, integer_means=True):
    """Statistics with every sign of γ (one γ = 0 channel) and means on the popcount
    grid, so that some BN outputs are exactly 0 (the tie sign(0) = +1 is exercised)."""
    gamma = rng.normal(size=channels).astype("float32")
    gamma[0], gamma[1], gamma[2] = 0.0, -abs(gamma[1]) - 0.1, abs(gamma[2]) + 0.1
    mean = (rng.integers(-4, 5, channels) if integer_means
            else rng.normal(size=channels) * 3).astype("float32")
    beta = np.where(np.arange(channels) % 3 == 0, 0.0, rng.normal(size=channels)).astype("float32")
    beta[0] = -0.5  # the γ = 0 channel is constantly low
    bn.gamma.assign(gamma)
    bn.beta.assign(beta)
    bn.moving_mean.assign(mean)
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))


def _binary_conv_model(kind, consumer, bias):
    sign = lambda: kquant.quantizer("sign", estimator="ste")  # noqa: E731
    inputs = keras.Input((6, 6, 5))
    if kind == "conv2d":
        x = kquant.QuantConv2D(7, 3, padding="same", use_bias=bias, kernel_quantizer=sign(),
                               input_quantizer=sign())(inputs)
    elif kind == "depthwise":
        x = kquant.QuantDepthwiseConv2D(3, padding="same", use_bias=bias, kernel_quantizer=sign(),
                                        input_quantizer=sign())(inputs)
    else:
        x = kquant.QuantDense(7, use_bias=bias, kernel_quantizer=sign(),
                              input_quantizer=sign())(keras.layers.Flatten()(inputs))
    x = keras.layers.BatchNormalization()(x)
    if consumer == "activation":
        x = kquant.QuantActivation(sign())(x)
        x = keras.layers.Flatten()(x)
        outputs = keras.layers.Dense(3)(x)
    else:
        x = keras.layers.Flatten()(x)
        outputs = kquant.QuantDense(3, kernel_quantizer=sign(), input_quantizer=sign())(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            _set_bn(layer, layer.gamma.shape[0], rng)
        elif isinstance(layer, (kquant.QuantConv2D, kquant.QuantDepthwiseConv2D,
                                kquant.QuantDense)):
            if layer.bias is not None:
                layer.bias.assign(rng.integers(-2, 3, layer.bias.shape).astype("float32"))
    return model


def _data(n=24):
    return np.random.default_rng(0).normal(size=(n, 6, 6, 5)).astype("float32")


def _binary_output(model, x):
    """The binary activation after the BN (unfolded) / threshold (folded)."""
    layer = next(l for l in model.layers if isinstance(l, (keras.layers.BatchNormalization,
                                                           BinaryThreshold)))
    probe = keras.Model(model.input, layer.output)
    out = ops.convert_to_numpy(probe(x, training=False))
    return out if isinstance(layer, BinaryThreshold) else np.where(out >= 0, 1.0, -1.0)


@pytest.mark.parametrize("kind,consumer,bias", [
    ("conv2d", "input_quantizer", True),
    pytest.param("dense", "activation", True, marks=SLOW_ON_JAX),
    pytest.param("depthwise", "input_quantizer", False, marks=SLOW_ON_JAX)])
def test_bn_after_binary_layer_folds_into_exact_integer_thresholds(kind, consumer, bias, tmp_path):
    model = _binary_conv_model(kind, consumer, bias)
    x = _data()
    deploy.export_weights(model, tmp_path / "folded.npz", fold_batch_norm=True)
    folded = deploy.load_inference_model(tmp_path / "folded.npz")
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    threshold = next(l for l in folded.layers if isinstance(l, BinaryThreshold))
    # the binary activations and the predictions are bit-identical
    binary = _binary_output(model, x)
    assert set(np.unique(binary)) == {-1.0, 1.0}
    np.testing.assert_array_equal(_binary_output(folded, x), binary)
    expected = ops.convert_to_numpy(model(x, training=False))
    got = ops.convert_to_numpy(folded(x, training=False))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))

    # the thresholds are the integer popcount sums at which sign(BN(·)) switches
    tau = ops.convert_to_numpy(threshold.thresholds)
    d = ops.convert_to_numpy(threshold.directions)
    assert tau.dtype == np.int32 and d.dtype == np.int8
    bn = next(l for l in model.layers if isinstance(l, keras.layers.BatchNormalization))
    gamma = ops.convert_to_numpy(bn.gamma)
    assert np.all(d[gamma < 0] == -1) and np.all(d[gamma > 0] == 1)
    qlayer = next(l for l in model.layers if isinstance(l, (kquant.QuantConv2D, kquant.QuantDense,
                                                            kquant.QuantDepthwiseConv2D)))
    fan_in = int(np.prod(qlayer.kernel.shape)) // tau.shape[0]
    bias_values = (ops.convert_to_numpy(qlayer.bias) if qlayer.bias is not None
                   else np.zeros(tau.shape[0], np.float32))
    mean, var = ops.convert_to_numpy(bn.moving_mean), ops.convert_to_numpy(bn.moving_variance)
    beta = ops.convert_to_numpy(bn.beta)
    for c in range(tau.shape[0]):  # float64 reference of sign(BN(s + b)) ≥ 0 for every s
        s = np.arange(-fan_in, fan_in + 1)
        z = gamma[c] * (s + bias_values[c] - mean[c]) / np.sqrt(var[c] + bn.epsilon) + beta[c]
        high = z >= 0
        folded_high = d[c] * s >= d[c] * tau[c]
        if gamma[c] == 0:
            assert not folded_high.any() and not high.any()  # β < 0: constantly low
        else:  # exact ties (z == 0) may round either way in float32: compare off the ties
            off_tie = np.abs(z) > 1e-4
            np.testing.assert_array_equal(folded_high[off_tie], high[off_tie])


def test_threshold_fold_is_validated_and_named_in_the_file(tmp_path):
    model = _binary_conv_model("conv2d", "input_quantizer", True)
    deploy.export_weights(model, tmp_path / "folded.npz", fold_batch_norm=True)
    with np.load(tmp_path / "folded.npz") as data:
        arrays = {k: data[k] for k in data.files}
    key = next(k for k in arrays if k.endswith(":thresholds") or k.endswith("thresholds:value"))
    assert arrays[key].dtype == np.int32
    levels = next(k for k in arrays if k.endswith("kernel:levels"))
    np.testing.assert_array_equal(np.abs(arrays[levels]), 1.0)  # ±1 codes: XNOR-ready
    arrays[key] = arrays[key] + 1
    with open(tmp_path / "bad.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(deploy.DeployFormatError, match="thresholds"):
        deploy.load_inference_model(tmp_path / "bad.npz")


def test_scaled_non_power_of_two_weights_fall_back_to_the_plain_fold(tmp_path):
    """BWN's mean|W| scales make the float sum inexact: no threshold fold (plain BN fold)."""
    bwn = kquant.quantizer("bwn", estimator="ste", per_channel=True)
    inputs = keras.Input((6, 6, 5))
    x = kquant.QuantConv2D(7, 3, kernel_quantizer=bwn,
                           input_quantizer=kquant.quantizer("sign", estimator="ste"))(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = kquant.QuantActivation(kquant.quantizer("sign", estimator="ste"))(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    model.layers[1].kernel.assign(np.random.default_rng(1).normal(size=(3, 3, 5, 7))
                                  .astype("float32") * 0.37)
    deploy.export_weights(model, tmp_path / "folded.npz", fold_batch_norm=True)
    folded = deploy.load_inference_model(tmp_path / "folded.npz")
    assert not any(isinstance(l, BinaryThreshold) for l in folded.layers)
    assert any(isinstance(l, keras.layers.Identity) for l in folded.layers)


@pytest.mark.parametrize("_", [pytest.param(None, marks=SLOW_ON_JAX)])
def test_depthwise_conv_batch_norm_folds(_, tmp_path):
    inputs = keras.Input((6, 6, 4))
    x = kquant.QuantDepthwiseConv2D(3, kernel_quantizer=kquant.quantizer(
        "bwn", estimator="ste", per_channel=True))(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    rng = np.random.default_rng(2)
    _set_bn(model.layers[2], 4, rng, integer_means=False)
    model.layers[1].bias.assign(rng.normal(size=4).astype("float32"))
    x = _data()[..., :4]
    deploy.export_weights(model, tmp_path / "folded.npz", fold_batch_norm=True)
    folded = deploy.load_inference_model(tmp_path / "folded.npz")
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    with np.load(tmp_path / "folded.npz") as data:
        key = next(k for k in data.files if k.endswith("kernel:fold_scale"))
        assert data[key].shape == (4,)
    expected = ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(ops.convert_to_numpy(folded(x, training=False)), expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.tf_only  # Keras' ONNX exporter traces TensorFlow graphs
def test_threshold_folded_model_runs_exactly_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from kquant.deploy import runtimes

    model = _binary_conv_model("conv2d", "input_quantizer", True)
    x = _data()
    info = runtimes.export_onnx(model, tmp_path / "m.onnx")
    weights = runtimes.onnx_integer_weights(tmp_path / "m.onnx")
    assert len(info["kernels"]) == 2 and all(str(a.dtype) == "int8" for a in weights.values())
    np.testing.assert_array_equal(runtimes.run_onnx(tmp_path / "m.onnx", x),
                                  ops.convert_to_numpy(model(x, training=False)))
