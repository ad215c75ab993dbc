"""Deployable bit-packed weights, kquant.summary accounting, FlipRatio."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant import deploy

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch


def _trained_model():
    base = kquant.models.build("small_convnet", (8, 8, 1), width=8)
    model = kquant.quantize_model(
        base, kernel_quantizer=kquant.quantizer("bwn", per_channel=True),
        input_quantizer=kquant.quantizer("uniform", bits=4, symmetric=False))
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 8, 1)).astype("float32")
    model.fit(x, rng.integers(0, 10, 32), epochs=2, batch_size=16, verbose=0)
    return model, x


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 7, 5))
    packed = deploy.pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(deploy.unpack_codes(packed, bits, codes.shape), codes)
    with pytest.raises(ValueError):
        deploy.pack_codes(codes + 2**bits, bits)


def test_export_is_binary_and_inference_model_is_exact(tmp_path):
    model, x = _trained_model()
    path = tmp_path / "w.npz"
    report = deploy.export_weights(model, path)
    for row in report:
        assert row["packed_bytes"] == -(-row["weights"] * row["bits"] // 8)
    for row in deploy.inspect_export(path):
        assert row["bits"] == 1 and row["distinct_codes"] <= 2
    inference = deploy.load_inference_model(path)
    np.testing.assert_array_equal(ops.convert_to_numpy(model(x, training=False)),
                                  ops.convert_to_numpy(inference(x, training=False)))
    # the inference kernels hold exactly two values per output channel (±scale)
    conv = [layer for layer in inference.layers if type(layer).__name__ == "QuantConv2D"][1]
    k = ops.convert_to_numpy(conv.kernel).reshape(-1, conv.kernel.shape[-1])
    assert all(np.unique(k[:, c]).size <= 2 for c in range(k.shape[1]))
    assert conv.kernel_quantizer is None and conv.input_quantizer is not None


def test_summary_counts_bits_memory_and_macs():
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        kquant.QuantConv2D(4, 3, kernel_quantizer="sign", input_quantizer="sign", use_bias=False),
        keras.layers.Flatten(),
        kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("dorefa", bits=2)),
    ])
    s = kquant.summary(model, print_summary=False)
    conv, dense = s.layers
    assert (conv.kernel_params, conv.kernel_bits, conv.input_bits) == (72, 1.0, 1.0)
    assert conv.macs == 72 * 4 * 4 and conv.mac_precision == "1×1"
    assert dense.kernel_params == 640 and dense.float_params == 10 and dense.kernel_bits == 2.0
    assert dense.macs == 640 and dense.mac_precision == "32×2"
    assert s.storage_bits == 72 * 1 + 640 * 2 + 10 * 32
    assert s.compression == pytest.approx(32 * (72 + 650) / (72 + 1280 + 320))
    assert s.macs_by_precision == {"1×1": 1152, "32×2": 640}
    assert "kquant summary" in str(s)


def test_flip_ratio_counts_level_changes():
    model = keras.Sequential([keras.Input((5,)), kquant.QuantDense(3, kernel_quantizer="sign")])
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    y = np.random.default_rng(1).normal(size=(64, 3)).astype("float32")
    for lr, moves in ((0.0, False), (1.0, True)):
        model.compile(keras.optimizers.SGD(lr), "mse")
        cb = kquant.callbacks.FlipRatio()
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[cb])
        assert len(cb.history) == 8 and all(0 <= r <= 1 for r in cb.history)
        assert (max(cb.history) > 0) == moves
