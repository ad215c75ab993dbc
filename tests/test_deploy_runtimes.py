"""ONNX (onnxruntime) and LiteRT round trips of a trained small convnet on the digits."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant.deploy import runtimes
from kquant.deploy.packing import unpack_codes

pytestmark = pytest.mark.tf_only  # Keras' ONNX and LiteRT exporters trace TensorFlow graphs
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained():
    (x, y), (xt, _) = kquant.datasets.load("digits")
    model = keras.Sequential([
        keras.Input(x.shape[1:]),
        kquant.QuantConv2D(16, 3, kernel_quantizer=kquant.quantizer("bwn", per_channel=True),
                           use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        kquant.QuantConv2D(32, 3, kernel_quantizer=kquant.quantizer("dorefa", bits=2),
                           input_quantizer="sign", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("uniform", bits=4)),
    ])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    return model, xt[:128].astype("float32")


def _codes(model):
    exp = runtimes.build_export(model)
    from kquant.deploy.folding import fold_batch_norms

    fold_batch_norms(model, exp)
    return {e["layer"]: (e, unpack_codes(exp.arrays[f"{e['path']}:codes"], e["bits"],
                                         tuple(e["shape"])))
            for e in exp.entries if e["kind"] == "quantized"}


def test_onnx_has_integer_weights_and_matches_keras(trained, tmp_path):
    model, x = trained
    info = runtimes.export_onnx(model, tmp_path / "m.onnx")
    ints = runtimes.onnx_integer_weights(tmp_path / "m.onnx")
    assert len(ints) == 3 and all(v.dtype == np.int8 for v in ints.values())
    grids = sorted(tuple(np.unique(v)) for v in ints.values())
    # kquant levels as integers: BWN ±1, DoReFa-2 odd integers, uniform-4 level indices
    assert (-1, 1) in grids and (-3, -1, 1, 3) in grids
    assert any(set(g) <= set(range(-8, 8)) and len(g) > 4 for g in grids)
    import onnx
    from onnx import numpy_helper

    floats = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT]
    assert not any(f.size in (144, 4608, 1440) for f in floats)  # no float copy of a kernel
    expected = ops.convert_to_numpy(model(x, training=False))
    scale = np.abs(expected).max()
    exact = runtimes.run_onnx(tmp_path / "m.onnx", x, fused=False)
    np.testing.assert_allclose(exact, expected, rtol=0, atol=1e-5 * scale)
    fused = runtimes.run_onnx(tmp_path / "m.onnx", x)  # onnxruntime's integer MatMulNBits
    assert np.abs(fused - expected).max() <= 0.02 * scale
    assert (fused.argmax(1) == expected.argmax(1)).mean() >= 0.97
    assert info["file_bytes"] > 0


def test_litert_has_int8_weights_with_exact_levels_and_matches_keras(trained, tmp_path):
    pytest.importorskip("ai_edge_litert")
    model, x = trained
    runtimes.export_litert(model, tmp_path / "m.tflite")
    codes = _codes(model)
    found = runtimes.litert_int8_weights(tmp_path / "m.tflite")
    matched = 0
    for _, weights, _ in found:
        for entry, c in codes.values():
            moved = np.moveaxis(c, -1, 0)  # TFLite keeps output channels first
            moved = moved.reshape(weights.shape) if moved.size == weights.size else None
            if moved is None:
                continue
            # level agreement: per channel, each kquant code is exactly one int8 value
            for ch in range(weights.shape[0]):
                pairs = set(zip(moved[ch].ravel().tolist(), weights[ch].ravel().tolist()))
                assert len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})
            matched += 1
    assert matched >= 2  # the 1 440- and 4 608-weight kernels (LiteRT leaves tiny ones float)
    expected = ops.convert_to_numpy(model(x, training=False))
    got = np.concatenate([runtimes.run_litert(tmp_path / "m.tflite", x[i:i + 1])
                          for i in range(len(x))])
    assert np.abs(got - expected).max() <= 0.03 * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.97
