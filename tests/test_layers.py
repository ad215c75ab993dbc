"""Quantized layers: forward math, config and .keras round trips, conversion."""

import keras
import numpy as np
import pytest
from keras import layers, ops

import kquant
from kquant import estimators

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch

QUANTIZERS = {
    "sign": lambda est: kquant.quantizers.Sign(estimator=est),
    "bwn": lambda est: kquant.quantizers.BWN(per_channel=True, estimator=est),
    "dorefa": lambda est: kquant.quantizers.DoReFa(bits=2, estimator=est),
    "uniform": lambda est: kquant.quantizers.Uniform(bits=4, estimator=est),
}
INPUT_QUANTIZERS = {
    "sign": lambda est: kquant.quantizers.Sign(estimator=est),
    "bwn": lambda est: None,
    "dorefa": lambda est: kquant.quantizers.Uniform(bits=2, symmetric=False, step=1 / 3,
                                                     estimator=est),
    "uniform": lambda est: kquant.quantizers.Uniform(bits=4, symmetric=False, estimator=est),
}


def every_layer_model(estimator):
    """One model holding every layer type × kernel quantizer, all with ``estimator``
    (input quantizers too, unless it is a whole-tensor estimator: those are refused there)."""
    inp = keras.Input((6, 6, 2))
    outs = []
    whole_tensor = getattr(estimators.get(estimator), "whole_tensor", False)
    for qname, make in QUANTIZERS.items():
        iq = (lambda est: None) if whole_tensor else INPUT_QUANTIZERS[qname]
        a = kquant.QuantConv2D(3, 3, kernel_quantizer=make(estimator),
                               input_quantizer=iq(estimator))(inp)
        b = kquant.QuantDepthwiseConv2D(3, kernel_quantizer=make(estimator),
                                        input_quantizer=iq(estimator), padding="same")(inp)
        c = kquant.QuantConv1D(2, 3, kernel_quantizer=make(estimator), padding="causal",
                               input_quantizer=iq(estimator))(layers.Reshape((36, 2))(inp))
        d = kquant.QuantDense(3, kernel_quantizer=make(estimator),
                              input_quantizer=iq(estimator))(layers.Flatten()(inp))
        outs += [layers.Flatten()(t) for t in (a, b, c, d)]
    out = layers.Dense(4)(layers.Concatenate()(outs))
    return keras.Model(inp, out)


@pytest.mark.parametrize("estimator", sorted(estimators.available()))
def test_save_load_identical_predictions_every_combination(estimator, tmp_path):
    if estimator in ("metaquant", "fcgrad", "multifc", "lstmfc"):
        pytest.skip("MetaQuant trains through its own model wrapper (tested in its plugin)")
    model = every_layer_model(estimator)
    model.compile(keras.optimizers.Adam(1e-2), "mse", run_eagerly=True)  # no tracing: fast
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 2)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x, training=False)),
                                  ops.convert_to_numpy(loaded(x, training=False)))
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    for layer in model.layers:
        if isinstance(layer, kquant.layers.QuantizedLayerMixin):
            config = layer.get_config()
            assert type(layer).from_config(config).get_config() == config
            assert config["kernel_quantizer"]["config"]["estimator"]["name"] == \
                estimators.serialize(layer.kernel_quantizer.estimator)["name"]


def test_quant_dense_forward_is_matmul_of_quantized_operands():
    layer = kquant.QuantDense(5, kernel_quantizer="bwn", input_quantizer="sign")
    x = np.random.default_rng(0).normal(size=(4, 7)).astype("float32")
    y = ops.convert_to_numpy(layer(x))
    w = ops.convert_to_numpy(layer.kernel)
    expected = np.where(x >= 0, 1.0, -1.0) @ (np.mean(np.abs(w)) * np.where(w >= 0, 1.0, -1.0))
    np.testing.assert_allclose(y, expected + ops.convert_to_numpy(layer.bias), rtol=1e-5,
                               atol=1e-5)


def test_quant_conv2d_forward_equals_float_conv_on_quantized_kernel():
    q = kquant.QuantConv2D(4, 3, kernel_quantizer=kquant.quantizer("dorefa", bits=2),
                           padding="same")
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32")
    y = q(x)
    f = keras.layers.Conv2D(4, 3, padding="same")
    f.build(x.shape)
    f.kernel.assign(q.quantized_kernel(training=False))
    f.bias.assign(q.bias)
    np.testing.assert_allclose(ops.convert_to_numpy(y), ops.convert_to_numpy(f(x)), atol=1e-5)


def test_quantize_model_keeps_weights_and_float_twin_matches_without_quantizers():
    base = kquant.models.build("small_convnet", (8, 8, 1))
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype("float32")
    twin = kquant.quantize_model(base, kernel_quantizer=None)
    np.testing.assert_allclose(base.predict(x, verbose=0), twin.predict(x, verbose=0), atol=1e-6)
    q = kquant.quantize_model(base, kernel_quantizer="sign", input_quantizer="sign",
                              skip_last=True)
    kinds = [type(layer).__name__ for layer in q.layers]
    assert kinds.count("QuantConv2D") == 2 and kinds[-1] == "Dense"
    first = [layer for layer in q.layers if type(layer).__name__ == "QuantConv2D"][0]
    assert first.input_quantizer is None  # the raw model input stays float
    np.testing.assert_array_equal(ops.convert_to_numpy(first.kernel),
                                  ops.convert_to_numpy(base.layers[1].kernel))
    with pytest.raises(TypeError, match="model"):
        kquant.quantize_model("not a model")


def test_string_quantizers_get_the_layer_estimator_and_unknown_names_fail():
    layer = kquant.QuantConv2D(2, 3, kernel_quantizer="dorefa", estimator="htge")
    assert type(layer.kernel_quantizer.estimator).__name__ == "HTGE"
    with pytest.raises(ValueError, match="Installed estimators"):
        kquant.QuantDense(2, kernel_quantizer="sign", estimator="nope")
