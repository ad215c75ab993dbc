"""Issue #12: data-initialised state vs NaN batches, inference calls and resuming.

A learnable uniform step is initialised from the first *finite training*
step the optimizer applies: a non-finite first batch or a skipped step with
finite activations (SkipNonFinite), an inference call before ``fit`` and a
dummy pass on zeros leave it untouched,
and training then reaches exactly the clean run's weights and accuracy.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant.testing import take_step
from kquant.callbacks import NonFiniteReport
from kquant.optimizers import SkipNonFinite

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch

BATCH = 32


def _data(n=4 * BATCH):
    (x, y), _ = kquant.datasets.load("digits")
    return x.reshape(len(x), -1)[:n].astype("float32"), y[:n]


def _model(jit=False, seed=5):
    keras.utils.set_random_seed(seed)
    m = keras.Sequential([
        keras.Input((64,)),
        kquant.QuantDense(32, kernel_quantizer=kquant.quantizer("uniform", bits=3),
                          input_quantizer=kquant.quantizer("uniform", bits=4, symmetric=False)),
        keras.layers.ReLU(),
        kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("uniform", bits=4, per_channel=True,
                                                                estimator="htge")),
    ])
    m.compile(SkipNonFinite(keras.optimizers.Adam(1e-2)),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              metrics=["accuracy"], jit_compile=jit)
    return m


def _quantizers(m):
    return [q for layer in m.layers for q in (getattr(layer, "kernel_quantizer", None),
                                              getattr(layer, "input_quantizer", None))
            if q is not None]


def _qstate(m):
    return [ops.convert_to_numpy(v).copy() for q in _quantizers(m) for v in q.weights]


def _weights(m):
    return [ops.convert_to_numpy(v).copy() for v in m.weights]


def test_inference_before_fit_never_initialises():
    x, y = _data()
    m = _model()
    before = _qstate(m)
    m.predict(x, batch_size=BATCH, verbose=0)
    m(x[:BATCH])                      # direct call: training falsy
    m.evaluate(x, y, batch_size=BATCH, verbose=0)
    for a, b in zip(before, _qstate(m)):
        np.testing.assert_array_equal(a, b)
    assert all(float(ops.convert_to_numpy(q.initialized)) == 0.0 for q in _quantizers(m))
    # ... and the trained result equals a model that never saw those calls
    m.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    clean = _model()
    clean.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(_weights(m), _weights(clean)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_dummy_pass_on_zeros_does_not_fix_the_step():
    """The issue's trap: a training-mode pass on zeros used to pin Δ at 1e-8 for good."""
    q = kquant.quantizer("uniform", bits=4)
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    q.build(x.shape)
    zeros = ops.convert_to_tensor(np.zeros_like(x))
    take_step(q, lambda: ops.sum(q(zeros, training=True)))
    assert float(ops.convert_to_numpy(q.initialized)) == 0.0
    take_step(q, lambda: ops.sum(q(x, training=True)))
    np.testing.assert_allclose(float(ops.convert_to_numpy(q.step_init)),
                               2 * np.mean(np.abs(x)) / np.sqrt(7), rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_first_batch_nan_leaves_state_and_training_matches_clean_run(jit):
    x, y = _data()
    bad = x[:BATCH].copy()
    bad[7, 20] = np.nan

    m = _model(jit)
    iq = m.layers[0].input_quantizer
    step_before = ops.convert_to_numpy(iq.step_init).copy()
    m.fit(bad, y[:BATCH], batch_size=BATCH, epochs=1, verbose=0)
    assert m.optimizer.skipped_steps == 1
    assert float(ops.convert_to_numpy(iq.initialized)) == 0.0   # waits for a finite batch
    np.testing.assert_array_equal(ops.convert_to_numpy(iq.step_init), step_before)
    # kernel steps see only the (finite, unchanged) kernel: whatever they hold equals
    # the clean run's first-step value; every trainable weight is unchanged
    assert all(np.isfinite(w).all() for w in _weights(m))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = m.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                  callbacks=[NonFiniteReport()])
    assert sum("skipped" in str(w.message) for w in caught) == 1

    clean = _model(jit)
    hc = clean.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(_weights(m), _weights(clean)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert h.history["accuracy"][-1] == pytest.approx(hc.history["accuracy"][-1])
    assert hc.history["accuracy"][-1] > 0.5  # it does learn


@pytest.mark.parametrize("jit", [False, True])
def test_skipped_step_with_finite_activations_stores_nothing(jit):
    """A NaN sample weight: every quantizer sees finite data (its own estimate is finite),
    the loss is NaN and SkipNonFinite skips the step; the steps are stored by the
    optimizer's apply (kquant.step_state), so none is, and training then equals the clean
    run. (Also what happens when an upstream ReLU maps a NaN pixel to 0.)"""
    x, y = _data()
    m = _model(jit)
    before = _qstate(m)
    weights = np.ones(BATCH, "float32")
    weights[3] = np.nan
    m.fit(x[:BATCH], y[:BATCH], sample_weight=weights, batch_size=BATCH, epochs=1, verbose=0)
    assert m.optimizer.skipped_steps == 1
    for a, b in zip(before, _qstate(m)):
        np.testing.assert_array_equal(a, b)
    assert all(float(ops.convert_to_numpy(q.initialized)) == 0.0 for q in _quantizers(m))
    m.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert all(float(ops.convert_to_numpy(q.initialized)) == 1.0 for q in _quantizers(m))
    clean = _model(jit)
    clean.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(_weights(m), _weights(clean)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_data_initialised_state_is_restored_exactly_on_resume(tmp_path):
    x, y = _data()
    m = _model()
    m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    m.save(tmp_path / "m.keras")
    r = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(_qstate(m), _qstate(r)):
        np.testing.assert_array_equal(a, b)
    m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    r.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(_weights(m), _weights(r)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
