"""Native deploy format for ALQ models: bit-packed bases, coordinates and masks;
bit-identical predictions; sizes against ALQ Eq. 26; ALQ trains, saves and
exports on every backend (int8 bases; bfloat16 on JAX)."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant import deploy

pytestmark = pytest.mark.core


def _data(n=8):
    return np.random.default_rng(0).normal(size=(n, 8, 8, 1)).astype("float32")


def _assert_same_predictions(model, inference, x):
    expected = ops.convert_to_numpy(model(x, training=False))
    got = ops.convert_to_numpy(inference(x, training=False))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def _alq_model():
    float_model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(10)])
    model = kquant.alq.quantize(float_model, max_bits=3)
    # prune some slots anywhere (not only the last ones): the mask is stored as it is
    for layer in kquant.alq.alq_layers(model):
        mask = ops.convert_to_numpy(layer.mask).copy()
        rng = np.random.default_rng(1)
        mask *= rng.random(mask.shape) > 0.3
        layer.mask.assign(mask)
        layer.coordinates.assign(ops.convert_to_numpy(layer.coordinates) * mask)
    return model


def test_alq_export_is_bit_packed_and_bit_identical(tmp_path):
    model = _alq_model()
    x = _data(8)
    path = tmp_path / "alq.npz"
    deploy.export_weights(model, path)
    _assert_same_predictions(model, deploy.load_inference_model(path), x)
    with np.load(path) as data:
        for layer, e in zip(kquant.alq.alq_layers(model), ("0", "2")):
            mask = ops.convert_to_numpy(layer.mask) > 0
            n = layer.layout.group_size
            assert data[f"{e}:bases"].dtype == np.uint8
            assert data[f"{e}:bases"].size == deploy.packed_size(mask.sum() * n, 1)
            assert data[f"{e}:coordinates"].shape == (mask.sum(),)
            assert data[f"{e}:mask"].size == deploy.packed_size(mask.size, 1)
            assert not any(k.startswith(f"{e}/kernel_tap") or k.startswith(f"{e}/bases")
                           for k in data.files)


def test_alq_storage_report_matches_eq26(tmp_path):
    model = _alq_model()
    report = deploy.alq_storage_report(model, tmp_path / "alq.npz")
    for row in report["layers"]:
        # bases + coordinates are Eq. 26 exactly; the mask (G·I_max bits) replaces the LUT
        assert row["bases_bytes"] + row["coordinates_bytes"] == pytest.approx(
            row["eq26_bits"] / 8, abs=1)
    total = report["total"]
    assert total["file_bytes"] == (tmp_path / "alq.npz").stat().st_size
    assert "Eq. 26" in deploy.format_alq_storage(report)


def test_alq_trains_saves_and_exports_on_every_backend(tmp_path):
    """Issue #8: int8 bases are a non-trainable variable the ALQ optimizer assigns (torch
    refuses gradients on integers); JAX keeps trainable bfloat16 bases (its stateless step
    writes back only trainable and optimizer variables)."""
    from kquant.alq.layers import bases_dtype

    model = keras.Sequential([keras.Input((8,)), kquant.alq.ALQDense(4, max_bits=3, group=4)])
    layer = model.layers[0]
    jax = keras.backend.backend() == "jax"
    assert layer.bases.dtype == bases_dtype() == ("bfloat16" if jax else "int8")
    assert any(v is layer.bases for v in model.trainable_variables) == jax
    model.compile(kquant.optimizers.ALQ(learning_rate=0.01, phase="bases"), "mse")
    rng = np.random.default_rng(0)
    x, y = rng.random((32, 8)).astype("float32"), rng.random((32, 4)).astype("float32")
    before_bases = ops.convert_to_numpy(ops.cast(layer.bases, "float32"))
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=5, batch_size=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < before
    after_bases = ops.convert_to_numpy(ops.cast(layer.bases, "float32"))
    assert np.any(after_bases != before_bases) and set(np.unique(after_bases)) <= {-1.0, 1.0}
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    _assert_same_predictions(model, reloaded, x)
    deploy.export_weights(model, tmp_path / "m.npz")
    _assert_same_predictions(model, deploy.load_inference_model(tmp_path / "m.npz"), x)
