"""Larq- and QKeras-style model code, only the imports changed: train, save, reload."""

import keras
import numpy as np
import pytest

import kquant_compat.larq as lq
from kquant import datasets
from kquant_compat.qkeras import QActivation, QConv2D, QDense, binary, quantized_bits, ternary

JIT = keras.backend.backend() != "torch"  # torch's jit_compile is TorchDynamo: not our target


def digits(n=512):
    (x, y), _ = datasets.load_digits()
    return x[:n], y[:n]


def larq_model():
    # as in Larq's guide, with `import larq as lq` replaced by `import kquant_compat.larq as lq`
    kwargs = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                  kernel_constraint="weight_clip", use_bias=False)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        lq.layers.QuantConv2D(16, 3, kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                              use_bias=False),
        keras.layers.BatchNormalization(scale=False),
        lq.layers.QuantConv2D(16, 3, **kwargs),
        keras.layers.BatchNormalization(scale=False),
        keras.layers.Flatten(),
        lq.layers.QuantDense(32, input_quantizer="approx_sign",
                             kernel_quantizer="magnitude_aware_sign",
                             kernel_constraint="weight_clip"),
        keras.layers.BatchNormalization(scale=False),
        lq.layers.QuantDense(10, input_quantizer=lq.quantizers.DoReFa(k_bit=2),
                             kernel_quantizer=lq.quantizers.SteTern(),
                             kernel_constraint=lq.constraints.WeightClip(1.0)),
        keras.layers.Activation("softmax"),
    ])


def qkeras_model():
    # QKeras-style: quantizer objects and strings, QActivation layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        QConv2D(16, 3, kernel_quantizer=quantized_bits(4, 0, 1), bias_quantizer=quantized_bits(8)),
        QActivation("quantized_relu(3, 1)"),
        keras.layers.Flatten(),
        QDense(32, kernel_quantizer=ternary(), bias_quantizer="quantized_bits(8, 2)"),
        QActivation("quantized_bits(4, 1)"),
        QDense(10, kernel_quantizer=binary(alpha=0.5)),
        QActivation("softmax"),
    ])


@pytest.mark.slow
@pytest.mark.parametrize("build", [larq_model, qkeras_model], ids=["larq", "qkeras"])
def test_ported_model_trains_saves_and_reloads(build, tmp_path):
    x, y = digits()
    model = build()
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=JIT)
    history = model.fit(x, y, epochs=4, batch_size=64, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["accuracy"][-1] > 0.3  # chance is 0.1
    for layer in model.layers:  # weight_clip keeps the latent binary kernels in [−1, 1]
        if getattr(layer, "kernel_constraint", None) is not None:
            assert np.max(np.abs(keras.ops.convert_to_numpy(layer.kernel))) <= 1.0
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(x, training=False)),
                                  keras.ops.convert_to_numpy(model(x, training=False)))
