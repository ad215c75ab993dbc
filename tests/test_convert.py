"""quantize_model covers nested models and every supported layer, or says what it left float."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers, ops

import kquant
from kquant.callbacks import quantized_layers

pytestmark = pytest.mark.core


def nested_transformer():
    """Functional model with a nested Sequential, attention, recurrent and conv layers."""
    inner = keras.Sequential([keras.Input((6, 8)), layers.Dense(8),
                              layers.GRU(8, return_sequences=True, unroll=True)],
                             name="inner")  # unrolled: eager JAX would compile a scan per call
    inp = keras.Input((6, 8))
    h = inner(inp)
    a = layers.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = layers.LayerNormalization()(a + h)
    h = layers.EinsumDense("abc,cd->abd", (6, 8), bias_axes="d")(h)
    h = layers.SeparableConv1D(4, 3)(h)
    h = layers.Conv1DTranspose(4, 2)(h)
    h = layers.LSTM(4, unroll=True)(h)
    return keras.Model(inp, layers.Dense(3)(h))


def _kernels(model):
    return [v for v in model.weights if "kernel" in v.path.split("/")[-1]]


def _x():
    return np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")


def test_nested_model_with_attention_is_fully_quantized_with_its_weights():
    model = nested_transformer()
    x = _x()
    twin, report = kquant.quantize_model(model, kernel_quantizer=None, return_report=True)
    assert report.left_float == [] and twin.quantization_report is report
    assert len(report.quantized) == 8  # dense, gru, mha, einsum, separable, transpose, lstm, dense
    np.testing.assert_allclose(ops.convert_to_numpy(model(x)), ops.convert_to_numpy(twin(x)),
                               rtol=1e-5, atol=1e-6)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left float: no warning
        q = kquant.quantize_model(model, kernel_quantizer="bwn", input_quantizer="sign")
    covered = {id(v) for layer in quantized_layers(q) for v, quantizer in
               layer.quantized_kernels() if quantizer is not None}
    kernels = _kernels(q)
    assert len(kernels) == len(_kernels(model)) == 14
    assert all(id(v) in covered for v in kernels)
    mha = q.get_layer("mha")
    assert isinstance(mha, kquant.QuantMultiHeadAttention)
    np.testing.assert_array_equal(ops.convert_to_numpy(mha.query_dense.kernel),
                                  ops.convert_to_numpy(model.get_layer("mha").query_dense.kernel))
    assert not np.allclose(ops.convert_to_numpy(q(x)), ops.convert_to_numpy(model(x)), atol=1e-3)


def test_quantized_nested_model_round_trips_through_keras_file(tmp_path):
    q = kquant.quantize_model(nested_transformer(), kernel_quantizer="bwn",
                              input_quantizer="sign")
    q.save(tmp_path / "q.keras")
    loaded = keras.saving.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(ops.convert_to_numpy(q(_x())),
                                  ops.convert_to_numpy(loaded(_x())))


def test_unsupported_layers_are_reported_warned_and_refused_when_strict():
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layers.Embedding(10, 3),
                              layers.SimpleRNN(3), layers.Dense(2)])
    with pytest.warns(UserWarning, match="embedding"):
        q, report = kquant.quantize_model(model, return_report=True)
    assert [(f.kind, f.requested) for f in report.left_float] == [("Embedding", False),
                                                                  ("SimpleRNN", False)]
    assert "no quantized twin for SimpleRNN" in str(report)
    assert isinstance(q.layers[-1], kquant.QuantDense)
    with pytest.raises(ValueError, match="strict=True.*\n.*embedding.*Embedding"):
        kquant.quantize_model(model, strict=True)


def test_requested_skips_are_in_the_report_without_a_warning():
    model = keras.Sequential([keras.Input((5,)), layers.Dense(4, name="a"),
                              layers.Dense(4, name="b"), layers.Dense(4, name="c"),
                              layers.Dense(2, name="d")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, report = kquant.quantize_model(model, skip_first=True, skip_last=True, strict=True,
                                          layer_filter=lambda layer: layer.name != "b",
                                          return_report=True)
    assert {(f.path, f.reason) for f in report.left_float} == {
        ("a", "skip_first=True"), ("d", "skip_last=True"), ("b", "layer_filter returned False")}
    assert report.quantized == ["c"] and report.unsupported == []
    assert [type(layer).__name__ for layer in q.layers] == ["Dense", "Dense", "QuantDense",
                                                             "Dense"]


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_subclassed_models_get_an_error_naming_the_alternative():
    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed.*kquant.QuantDense"):
        kquant.quantize_model(model)
    inp = keras.Input((3,))
    outer = keras.Model(inp, layers.Dense(2)(model(inp)))
    with pytest.raises(TypeError, match="subclassed model 'subclassed"):
        kquant.quantize_model(outer)


def test_quantizer_arguments_are_validated_up_front():
    with pytest.raises(ValueError, match="`estimator`.*`kernel_quantizer`"):
        kquant.quantize_model(nested_transformer(), kernel_quantizer=kquant.quantizers.Sign(),
                              estimator="ste")
    with pytest.raises(TypeError, match="model"):
        kquant.quantize_model("not a model")
