"""SkipNonFinite: a step with NaN/inf gradients leaves weights and optimizer state unchanged."""

import warnings

import keras
import numpy as np
import pytest

import kquant
from kquant.callbacks import NonFiniteReport
from kquant.optimizers import SkipNonFinite
from kquant.testing import run_on_two_cpus

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch


def _model(jit):
    m = keras.Sequential([
        keras.Input((6,)),
        kquant.QuantDense(8, kernel_quantizer=kquant.quantizer("uniform", bits=2)),
        keras.layers.ReLU(),
        kquant.QuantDense(3, kernel_quantizer="bwn", input_quantizer="sign"),
    ])
    m.compile(SkipNonFinite(keras.optimizers.Adam(1e-2)),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    return m


def _state(m):
    return [np.array(v) for v in m.weights] + [np.array(v) for v in m.optimizer.variables]


@pytest.mark.parametrize("jit", [False, True])
def test_non_finite_step_is_skipped_and_counted(jit):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)
    m = _model(jit)
    m.fit(x, y, batch_size=16, epochs=1, verbose=0)  # builds optimizer state
    before = _state(m)
    iterations = int(m.optimizer.iterations)

    bad = x.copy()
    bad[3, 2] = np.inf  # the first layer's kernel gradient becomes inf/NaN
    m.fit(bad, y, batch_size=16, epochs=1, verbose=0)
    after = _state(m)
    assert m.optimizer.skipped_steps == 1
    assert int(m.optimizer.iterations) == iterations
    # Only the skip counter moved: weights, moments and iteration counts are equal.
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    names = [v.path for v in m.weights] + [v.path for v in m.optimizer.variables]
    assert [names[i] for i in changed] == [m.optimizer.step_counter.path]

    m.fit(x, y, batch_size=16, epochs=1, verbose=0)  # finite again: trains
    assert int(m.optimizer.iterations) == iterations + 1
    assert not np.array_equal(_state(m)[0], after[0])
    assert all(np.isfinite(w).all() for w in _state(m))


@pytest.mark.parametrize("quantized", [False, True])
def test_finite_training_equals_the_inner_optimizer(quantized):
    """Equal up to float rounding: on JAX the wrapper's update runs inside ``lax.cond``,
    which XLA compiles and fuses (1 ulp off the inner optimizer alone, even eagerly).
    Through the quantized model's sign input quantizer such an ulp can flip a level and
    grow over later steps, so that model is compared after one step and the float model
    (same layers, no quantizers) after eight."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, 32)
    weights = []
    for wrap in (False, True):
        keras.utils.set_random_seed(3)
        m = _model(False) if quantized else _float_model()
        if not wrap:
            m.compile(keras.optimizers.Adam(1e-2),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x, y, batch_size=32 if quantized else 8, epochs=1 if quantized else 2, verbose=0,
              shuffle=False)
        assert int(m.optimizer.iterations) == (1 if quantized else 8)
        weights.append([np.array(w) for w in m.weights])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _float_model():
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.ReLU(),
                          keras.layers.Dense(3)])
    m.compile(SkipNonFinite(keras.optimizers.Adam(1e-2)),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return m


def test_report_callback_warns_once_and_logs_count():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 6)).astype("float32")
    x[0, 0] = np.nan
    y = rng.integers(0, 3, 16)
    m = _model(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = m.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[NonFiniteReport()])
    assert h.history["skipped_steps"] == [1, 2]
    assert sum("skipped" in str(w.message) for w in caught) == 1


def test_serialization_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)
    m = _model(False)
    m.fit(x, y, batch_size=8, epochs=1, verbose=0)
    m.save(tmp_path / "m.keras")
    r = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(r.optimizer, SkipNonFinite)
    assert isinstance(r.optimizer.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_array_equal(m.predict(x, verbose=0), r.predict(x, verbose=0))
    cfg = SkipNonFinite(keras.optimizers.SGD(0.1)).get_config()
    assert float(SkipNonFinite.from_config(cfg).inner_optimizer.learning_rate) == pytest.approx(0.1)


def test_bad_arguments_are_rejected():
    with pytest.raises(TypeError, match="inner_optimizer"):
        SkipNonFinite(42)  # names and configs are looked up; anything else is refused
    with pytest.raises(ValueError, match="clipnorm"):
        SkipNonFinite(keras.optimizers.Adam(), clipnorm=1.0)


@pytest.mark.tf_only
def test_skip_under_mirrored_strategy():
    """Two replicas, one of which sees an inf: the step is skipped on both."""
    out = run_on_two_cpus("""
        import numpy as np, tensorflow as tf, keras, kquant
        rng = np.random.default_rng(0)
        x = rng.normal(size=(16, 6)).astype("float32"); y = rng.integers(0, 3, 16)
        with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
            m = keras.Sequential([keras.Input((6,)), kquant.QuantDense(8, kernel_quantizer="bwn"),
                                  keras.layers.ReLU(), kquant.QuantDense(3)])
            m.compile(kquant.optimizers.SkipNonFinite(keras.optimizers.Adam(1e-2)),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
        before = [w.numpy() for w in m.weights]
        bad = x.copy(); bad[12, 1] = np.inf   # lands on the second replica
        m.fit(bad, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        after = [w.numpy() for w in m.weights]
        assert m.optimizer.skipped_steps == 1, m.optimizer.skipped_steps
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
        m.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert not np.array_equal(before[0], m.weights[0].numpy())
        print("OK")
    """, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
