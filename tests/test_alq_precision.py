"""ALQ under mixed precision, with a NaN first batch, after inference-before-fit; byte bases."""

import keras
import numpy as np
import pytest
from keras import ops

from alq_toys import toy_data, toy_model
from kquant.alq import ALQ, ALQDense, alq_layers, fit_pipeline
from kquant.alq.layers import bases_dtype


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


_data = toy_data
_model = toy_model


def _compile(model):
    model.compile(ALQ(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=keras.backend.backend() == "jax")
    return model


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_levels_exact_training_and_float32_twin(policy):
    x, y = _data()
    keras.config.set_dtype_policy(policy)
    try:
        model = _model()
        _, schedule = fit_pipeline(model, x, y, batch_size=32, rounds=1, prune_epochs=1,
                                   bases_epochs=1, coordinates_epochs=1, bases_lr=1e-2,
                                   coordinates_lr=1e-2, ratio=0.6, verbose=0, shuffle=False,
                                   jit_compile=keras.backend.backend() == "jax")
        predictions = _np(model.predict(x, verbose=0))
    finally:
        keras.config.set_dtype_policy("float32")
    assert [r["phase"] for r in schedule.log] == ["prune", "bases", "coordinates"]
    assert all(np.isfinite(r["loss"]) for r in schedule.log)
    assert schedule.log[-1]["average_bits"] < schedule.log[0]["average_bits"] + 1e-9 < 3
    for layer in alq_layers(model):
        kernel = layer.grouped_kernel()
        assert keras.backend.standardize_dtype(kernel.dtype) == "float32"  # whatever the policy
        bases, alpha, mask = (_np(v) for v in layer.alq_state())
        exact = np.einsum("gni,gi->gn", bases.astype(np.float32), (alpha * mask).astype(np.float32))
        np.testing.assert_allclose(_np(kernel), exact, rtol=1e-6, atol=1e-7)
        assert set(np.unique(bases)) <= {-1.0, 1.0}
    activation = alq_layers(model)[-1].input_quantizer
    assert keras.backend.standardize_dtype(activation.levels()[0].dtype) == "float32"
    # The same state in a float32 model (what an export rebuilds) predicts the same.
    twin = _model()
    twin.set_weights(model.get_weights())
    # Rounding of the half-precision activations may move a few inputs of the activation
    # quantizer across a level boundary (a tail of rows off by a level step, bfloat16:
    # ~10 % of the rows at 4-10 %, how many depends on the trajectory); the typical row
    # agrees to the half-precision rounding.
    tolerance = 0.05 if policy == "mixed_bfloat16" else 5e-3
    reference = _np(twin.predict(x, verbose=0))
    error = np.max(np.abs(reference - predictions) / (1 + np.abs(reference)), axis=1)
    assert np.median(error) <= tolerance / 5, np.median(error)
    assert (error <= tolerance).mean() >= 0.85, np.sort(error)
    assert (reference.argmax(1) == predictions.argmax(1)).mean() >= 0.95


def test_nan_first_batch_and_inference_before_fit_change_nothing():
    x, y = _data()
    clean = _compile(_model())
    poisoned = _compile(_model())
    poisoned.predict(x, verbose=0)  # inference never initialises the activation statistics
    activation = alq_layers(poisoned)[-1].input_quantizer
    assert _np(activation.initialized) == 0
    poisoned.optimizer.build(poisoned.trainable_variables)
    state = lambda m: [_np(v) for v in m.weights] + [_np(v) for v in m.optimizer.variables  # noqa
                                                       if "non_finite" not in v.path]
    before = state(poisoned)
    bad = x[:32].copy()
    bad[3, 2, 2, 1] = np.nan  # one NaN pixel in the very first batch
    poisoned.train_on_batch(bad, y[:32])
    for a, b in zip(before, state(poisoned)):
        np.testing.assert_array_equal(b, a)  # B, α, mask, biases, x_ref, γ, moments, iterations
    assert _np(activation.initialized) == 0
    assert alq_layers(poisoned)[0].bases.dtype == clean.layers[1].bases.dtype
    assert poisoned.optimizer.non_finite_steps == 1
    for model in (clean, poisoned):
        model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    assert _np(activation.initialized) == 1
    for a, b in zip(clean.weights, poisoned.weights):
        np.testing.assert_allclose(_np(b), _np(a), rtol=1e-6, atol=1e-7)
    assert clean.evaluate(x, y, verbose=0) == poisoned.evaluate(x, y, verbose=0)


def test_bases_are_not_stored_as_float32():
    """Issue #8: int8 bases (bfloat16 on JAX, whose autodiff needs a floating variable)."""
    layer = ALQDense(16, max_bits=6)
    layer.build((None, 32))
    expected = "bfloat16" if keras.backend.backend() == "jax" else "int8"
    assert bases_dtype() == expected and layer.bases.dtype == expected
    values = _np(layer.bases)
    assert set(np.unique(values)) <= {-1.0, 1.0}
    kernel = np.random.default_rng(0).normal(size=(32, 16))
    layer.set_float_kernel(kernel)
    assert layer.bases.dtype == bases_dtype()
    # The forward kernel is the float32 decode of the byte bases.
    exact = np.einsum("gni,gi->gn", _np(layer.bases), _np(layer.coordinates) * _np(layer.mask))
    np.testing.assert_allclose(_np(layer.grouped_kernel()), exact, rtol=1e-5, atol=1e-6)
