"""ALQ state survives: save → load predictions, checkpoint → resume weights, storage/activations."""

import keras
import numpy as np
import pytest
from keras import ops

from kquant.alq import ALQActivation, ALQConv2D, ALQDense, storage_table, plot_bitwidths
from kquant.optimizers import ALQ


def _np(v):
    return np.asarray(ops.convert_to_numpy(v))


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    h = ALQConv2D(4, 3, padding="same", activation="relu", max_bits=3)(inputs)
    h = keras.layers.Flatten()(h)
    outputs = ALQDense(3, max_bits=2, group=16, input_quantizer=ALQActivation(2))(h)
    model = keras.Model(inputs, outputs)
    model.compile(ALQ(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.random((32, 6, 6, 2)).astype("float32"), rng.integers(0, 3, 32)


def test_save_load_identical_predictions_and_resume(tmp_path):
    x, y = _data()
    reference = _model()
    reference.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    reference.optimizer.phase = "coordinates"
    path = tmp_path / "alq.keras"
    reference.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(restored.predict(x, verbose=0)),
                                  _np(reference.predict(x, verbose=0)))
    assert isinstance(restored.optimizer, ALQ) and restored.optimizer.phase == "coordinates"
    for a, b in zip(reference.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(_np(a), _np(b))
    # Resume: N more steps on both give identical weights (moments, phase, B, α, mask saved).
    for model in (reference, restored):
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
    for a, b in zip(reference.weights, restored.weights):
        np.testing.assert_array_equal(_np(a), _np(b))


def test_storage_table_eq26_and_stats(tmp_path):
    model = _model()
    conv = model.layers[1]
    mask = _np(conv.mask).copy()
    mask[:5] = 0  # remove five groups
    conv.mask.assign(mask)
    rows = {r["layer"]: r for r in storage_table(model)}
    r = rows[conv.name]
    n, big_n = 2, 3 * 3 * 2 * 4
    bits = mask.sum(axis=1)
    avg = bits.mean()
    assert r["groups_removed"] == 5 and r["group_size"] == n
    assert r["average_bits"] == pytest.approx(avg)
    eq26 = avg * big_n + 32 * avg * big_n / n
    assert r["eq26_bits"] == pytest.approx(eq26)
    assert r["compression"] == pytest.approx(32 * big_n / (eq26 + big_n / n * 2))  # LUT: 2 bits
    stats = conv.quantization_stats()
    assert stats.kernel_bits == pytest.approx(avg)
    assert stats.extra_bits == int(32 * bits.sum() + (big_n // n) * 2)
    assert stats.macs == 6 * 6 * 9 * 2 * 4
    assert model.layers[-1].quantization_stats().input_bits == 2
    assert rows["total"]["weights"] == big_n + 144 * 3
    png = plot_bitwidths(model, tmp_path / "bits.png")
    assert png.stat().st_size > 1000


def test_activation_quantizer_levels_fit_better_than_shifted_levels():
    # momentum 0: after one step the state is the batch least-squares fit for its codes.
    inputs = keras.Input((8,))
    layer = ALQActivation(bits=2, momentum=0.0)
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    x = np.random.default_rng(5).normal(size=(256, 8)).astype("float32")
    model.train_on_batch(x, np.zeros_like(x))
    ref, gamma = float(_np(layer.reference)), _np(layer.gamma)
    assert ref > 0 and (gamma > 0).all()
    target = np.maximum(x, 0)
    err_fit = np.mean((target - _np(layer(x, training=False))) ** 2)
    shifted = ALQActivation(bits=2)
    shifted.build(x.shape)
    shifted.reference.assign(ref * 1.3)
    shifted.gamma.assign(gamma)
    assert err_fit < np.mean((target - _np(shifted(x, training=False))) ** 2)


def test_summary_hook_and_optimizer_export():
    import kquant.optimizers
    from kquant.alq import format_table

    assert kquant.optimizers.ALQ is ALQ

    text = format_table(storage_table(_model()))
    assert "total" in text and "avg bits" in text
