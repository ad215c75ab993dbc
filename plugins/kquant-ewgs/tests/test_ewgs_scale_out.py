"""EWGS where users run it: first-batch NaN, inference before fit, and the
distribution matrix entries (MirroredStrategy on 2 logical CPUs, JAX
DataParallel on 2 host devices) for EWGS with δ refresh, ManiQuant's WCG and
MetaQuant MultiFC: weights, state and predictions equal to one device."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant import step_state
from kquant.testing import run_replicated
from kquant_ewgs import EWGS, DeltaUpdate, EWGSDense, EWGSQuantizer

BACKEND = keras.backend.backend()


def _model():
    def est():
        return EWGS(delta=0.0, adaptive=True)

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        EWGSDense(16, kernel_quantizer=EWGSQuantizer(2, estimator=est()),
                  input_quantizer=EWGSQuantizer(2, kind="activation", estimator=est())),
        keras.layers.ReLU(),
        EWGSDense(10, kernel_quantizer=EWGSQuantizer(2, estimator=est()),
                  input_quantizer=EWGSQuantizer(2, kind="activation", estimator=est())),
    ])


def _state(model):
    """Data-initialised state (activation intervals, output scales: step statistics) and
    δ. The weight intervals ∓3σ(W) depend on W alone, which a skipped step leaves
    unchanged."""
    layers = [layer for layer in model.layers if isinstance(layer, EWGSDense)]
    owners = [layer.input_quantizer for layer in layers] + [layer.output_scaler for layer in layers]
    owners += [layer.kernel_quantizer.estimator for layer in layers]
    state = {v.path: np.array(ops.convert_to_numpy(v)) for o in owners for v in o.weights
             if not v.trainable or step_state.is_statistic(v)}
    assert sum("initialized" in k for k in state) == 4 and any("delta" in k for k in state)
    return state


@pytest.mark.parametrize("jit", [False, True])
def test_nan_first_batch_and_inference_leave_state_unchanged(jit):
    x, y = kquant.datasets.load("digits")[0]
    x, y = x[:64], y[:64]
    model = _model()
    model.compile(kquant.optimizers.SkipNonFinite(keras.optimizers.Adam(1e-3)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    fresh = _state(model)
    assert all(v == 0 for k, v in fresh.items() if "initialized" in k)
    model.predict(x, verbose=0)                              # inference first: no initialisation
    model.evaluate(x, y, verbose=0)
    bad = x.copy()
    bad[5, 3, 3, 0] = np.nan                                 # NaN in the very first training batch
    model.fit(bad[:32], y[:32], batch_size=32, epochs=1, verbose=0)
    assert model.optimizer.skipped_steps == 1
    for k, v in _state(model).items():
        np.testing.assert_array_equal(v, fresh[k], err_msg=k)
    for layer in (model.layers[2], model.layers[4]):   # the weight intervals wait too
        assert float(ops.convert_to_numpy(layer.kernel_quantizer.initialized)) == 0
    w = [ops.convert_to_numpy(layer.kernel) for layer in (model.layers[2], model.layers[4])]
    a = ops.convert_to_numpy(model.layers[1](x[32:].reshape(32, -1)))   # what q will see
    model.fit(x[32:], y[32:], batch_size=32, epochs=1, verbose=0)   # first finite batch
    after = _state(model)
    assert all(v == 1 for k, v in after.items() if "initialized" in k)
    for layer, w0 in zip((model.layers[2], model.layers[4]), w):   # l₀, u₀ = ∓3σ(W) of the W it saw
        q = layer.kernel_quantizer
        stored = [float(ops.convert_to_numpy(v)) for v in (q.lower_init, q.upper_init)]
        np.testing.assert_allclose(stored, (-3 * w0.std(), 3 * w0.std()), rtol=1e-4)
    q = model.layers[2].input_quantizer
    np.testing.assert_allclose(ops.convert_to_numpy(q.upper_init), 3 * a.std() / np.sqrt(1 - 2 / np.pi),
                               rtol=1e-4)
    model.fit(bad[:32], y[:32], batch_size=32, epochs=1, verbose=0)  # and a later NaN batch
    for k, v in _state(model).items():
        np.testing.assert_array_equal(v, after[k], err_msg=k)


@pytest.mark.parametrize("jit", [False, True])
def test_skipped_step_with_finite_activations_leaves_state_unchanged(jit):
    """A NaN sample weight: every activation is finite (each quantizer's own estimate is
    finite), the loss and gradients are not, the optimizer skips the step, and no
    data-initialised value may be stored from it: the write is the optimizer's."""
    x, y = kquant.datasets.load("digits")[0]
    x, y = x[:64], y[:64]
    model = _model()
    model.compile(kquant.optimizers.SkipNonFinite(keras.optimizers.Adam(1e-3)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    fresh = _state(model)
    weights = np.ones(32, "float32")
    weights[3] = np.nan
    model.fit(x[:32], y[:32], sample_weight=weights, batch_size=32, epochs=1, verbose=0)
    assert model.optimizer.skipped_steps == 1
    for k, v in _state(model).items():
        np.testing.assert_array_equal(v, fresh[k], err_msg=k)
    a = ops.convert_to_numpy(model.layers[1](x[32:].reshape(32, -1)))
    model.fit(x[32:], y[32:], batch_size=32, epochs=1, verbose=0)   # a step that is taken
    assert model.optimizer.skipped_steps == 1
    assert all(v == 1 for k, v in _state(model).items() if "initialized" in k)
    np.testing.assert_allclose(ops.convert_to_numpy(model.layers[2].input_quantizer.upper_init),
                               3 * a.std() / np.sqrt(1 - 2 / np.pi), rtol=1e-4)


def test_delta_update_refuses_non_finite_reference_data():
    """NaN pixels may reach the probe as NaN or, through a ReLU, as a finite but wrong
    batch (platform-dependent): the reference data is checked before training."""
    x, y = kquant.datasets.load("digits")[0]
    bad = x[:32].copy()
    bad[4, 2, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"`x` has 1 NaN/inf value\(s\) \(first at index \(4, 2, 2, 0\)\)"):
        DeltaUpdate(bad, y[:32], every=1, batch_size=32, samples=2)
    with pytest.raises(ValueError, match="`y` has 1 NaN/inf"):
        DeltaUpdate(x[:32], np.where(np.arange(32) == 7, np.inf, y[:32]), every=1)


# -- the distribution matrix ---------------------------------------------------------
KINDS = ("ewgs", "wcg", "multifc", "lstmfc")   # every plugin is installed where this runs
_MATRIX = """
import importlib.util, numpy as np, keras, kquant

def build(kind):
    L = keras.layers
    if kind == "ewgs":
        from kquant_ewgs import EWGS, EWGSDense, EWGSQuantizer
        q = lambda k: EWGSQuantizer(2, kind=k, estimator=EWGS(delta=0.0, adaptive=True))
        body = [EWGSDense(16, kernel_quantizer=q("weight"), input_quantizer=q("activation")),
                L.ReLU(), EWGSDense(10, kernel_quantizer=q("weight"), input_quantizer=q("activation"))]
    elif kind == "wcg":
        body = [kquant.QuantDense(16, kernel_quantizer=kquant.quantizer("dorefa", bits=2, estimator="wcg")),
                L.ReLU(), kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("bwn", estimator="wcg"))]
    else:   # MetaQuant: MultiFC, and LSTMFC with its per-coordinate states
        est = lambda: kind if kind == "multifc" else {"name": "lstmfc", "config": {"hidden": 4}}
        body = [kquant.QuantDense(16, kernel_quantizer=kquant.quantizer("bwn", estimator=est())),
                L.ReLU(), kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("bwn", estimator=est()))]
    m = keras.Sequential([keras.Input((8, 8, 1)), L.Flatten(), L.Dense(16, activation="relu"), *body])
    if kind in ("multifc", "lstmfc"):
        import kquant_metaquant
        m = kquant_metaquant.MetaQuant(m)
        m.meta_network.block_rows = 16   # LSTMFC under XLA (JAX): rows in blocks of 16
    return m

def train(kind, start=None):
    keras.utils.set_random_seed(0)
    m = build(kind)
    if start is not None:
        for v, s in zip(m.weights, start):
            v.assign(s)
    m.compile(keras.optimizers.SGD(0.05, momentum=0.9),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
    start = [np.array(v) for v in m.weights]
    cbs = []
    if kind == "ewgs":
        from kquant_ewgs import DeltaUpdate
        cbs = [DeltaUpdate(X, Y, every=3, batch_size=32, samples=3, num_batches=1, tol=0.0)]
    m.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0, callbacks=cbs)
    return start, [np.array(v) for v in m.weights], np.array(m.predict(X, batch_size=32, verbose=0))

(X, Y), _ = kquant.datasets.load("digits")
X, Y = X[:128], Y[:128]
for kind, module in (("ewgs", "kquant_ewgs"), ("wcg", "kquant_maniquant"), ("multifc", "kquant_metaquant"),
                     ("lstmfc", "kquant_metaquant")):
    if importlib.util.find_spec(module) is None:
        print("SKIP", kind); continue
    with ONE():
        start, w1, p1 = train(kind)
    with REPLICAS():
        _, w2, p2 = train(kind, start)
    assert len(w1) == len(w2)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2))
    assert worst < 2e-4, (kind, worst)
    assert float(np.max(np.abs(p1 - p2))) < 2e-4, (kind, float(np.max(np.abs(p1 - p2))))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w1, start)) > 1e-3, kind  # it trained
    print("OK", kind, worst)
"""

@pytest.mark.tf_only
def test_matrix_mirrored_strategy_equals_one_device():
    out = run_replicated(_MATRIX, "mirrored")
    assert out.returncode == 0 and all(f"OK {k}" in out.stdout for k in KINDS), out.stdout + out.stderr[-4000:]


@pytest.mark.distributed
@pytest.mark.skipif(BACKEND != "jax", reason="the JAX DataParallel entry runs with the JAX suite")
def test_matrix_jax_data_parallel_equals_one_device():
    out = run_replicated(_MATRIX, "data_parallel")
    assert out.returncode == 0 and all(f"OK {k}" in out.stdout for k in KINDS), out.stdout + out.stderr[-4000:]
