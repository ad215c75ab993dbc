"""ALQActivation (ALQ §4): running ``x_ref``/``γ`` against a NumPy reference, written by
the optimizer's step (kquant.step_state), so a skipped step leaves them unchanged (#12)."""

import keras
import numpy as np
import pytest
from alq_toys import toy_data, toy_model
from keras import ops

from kquant.alq import ALQActivation
from kquant.alq.steps import sign_patterns
from kquant.optimizers import ALQ, SkipNonFinite


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _initial(target, bits):
    mean, std = target.mean(), target.std()
    low = max(target.min(), 0.0)
    high = max(min(mean + 3 * std, target.max()), low + 1e-3)
    steps = 2.0 ** np.arange(bits) / (2.0**bits - 1)
    return 0.5 * (low + high), 0.5 * (high - low) * steps


def _batch_fit(target, ref, gamma, bits):
    patterns = sign_patterns(bits).astype(np.float64)
    values = ref + patterns @ gamma
    flat = target.reshape(-1)
    codes = patterns[np.argmin(np.abs(flat[:, None] - values[None, :]), axis=1)]
    features = np.concatenate([np.ones((flat.size, 1)), codes], axis=1)
    gram = features.T @ features / flat.size + 1e-6 * np.eye(bits + 1)
    solution = np.linalg.solve(gram, features.T @ flat / flat.size)
    return solution[0], np.abs(solution[1:])


def _reference_statistics(batches, bits, momentum):
    """x_ref, γ after one training step per batch (ALQ §4 running least squares)."""
    ref = gamma = None
    for x in batches:
        target = np.maximum(x.astype(np.float64), 0.0)
        if ref is None:
            ref, gamma = _initial(target, bits)
        batch_ref, batch_gamma = _batch_fit(target, ref, gamma, bits)
        ref = momentum * ref + (1 - momentum) * batch_ref
        gamma = momentum * gamma + (1 - momentum) * batch_gamma
    return ref, gamma


def _activation_model(bits, momentum):
    inputs = keras.Input((8,))
    act = ALQActivation(bits, momentum=momentum)
    out = keras.layers.Dense(1, kernel_initializer="ones")(act(inputs))
    return keras.Model(inputs, out), act


@pytest.mark.core
@pytest.mark.parametrize("optimizer", ["sgd", "alq"])
def test_statistics_follow_the_running_least_squares_fit(optimizer):
    """Two training steps: initial levels from the first batch, then the batch LSQ fit for the
    codes it chose, averaged with momentum; written by any Keras optimizer (overwrite with
    gradient) and by ALQ (inside its per-step guard)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 64, 8)).astype("float32")
    model, act = _activation_model(bits=2, momentum=0.5)
    model.compile(ALQ(learning_rate=1e-3) if optimizer == "alq" else keras.optimizers.SGD(0.01),
                  "mse")
    for batch in x:
        model.train_on_batch(batch, np.zeros((64, 1), "float32"))
    ref, gamma = _reference_statistics(x, bits=2, momentum=0.5)
    np.testing.assert_allclose(_np(act.reference), ref, rtol=2e-5)
    np.testing.assert_allclose(_np(act.gamma), gamma, rtol=2e-5)
    assert _np(act.initialized) == 1.0
    # inference uses the nearest stored level; an inference call writes nothing
    levels = np.sort(_np(act.levels()[0]))
    target = np.maximum(x[0], 0)
    nearest = levels[np.argmin(np.abs(target[..., None] - levels), axis=-1)]
    np.testing.assert_allclose(_np(act(x[0], training=False)), nearest, atol=1e-6)
    before = [_np(v) for v in act.weights]
    model.predict(x[1], verbose=0)
    act(x[1], training=True)  # a training-mode call outside a step: no optimizer, no write
    for a, b in zip(before, act.weights):
        np.testing.assert_array_equal(_np(b), a)


@pytest.mark.core
def test_frozen_activation_keeps_statistics():
    model, act = _activation_model(bits=2, momentum=0.5)
    act.trainable = False
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = np.random.default_rng(1).normal(size=(32, 8)).astype("float32")
    model.train_on_batch(x, np.zeros((32, 1), "float32"))
    assert _np(act.initialized) == 0.0 and _np(act.reference) == 0.0


def _state(model):
    return {v.path: np.array(_np(v)) for v in model.weights}


@pytest.mark.parametrize("wrap", ["alq", "skip_non_finite_adam"])
def test_non_finite_loss_leaves_activation_statistics_unchanged(wrap):
    """A batch whose activations are finite but whose loss is not (NaN sample weights): the
    optimizer skips the step, and x_ref/γ (and the initialisation flag) stay as they were."""
    keras.utils.set_random_seed(0)
    x, y = toy_data(64)
    model = toy_model()
    opt = ALQ(learning_rate=0.01) if wrap == "alq" else SkipNonFinite(keras.optimizers.Adam())
    if wrap != "alq":   # an Adam-trained float twin: the ALQ layers' state is the optimizer's
        model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Flatten(),
                                  ALQActivation(2), keras.layers.Dense(2)])
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)   # statistics initialised
    act = [layer for layer in model._flatten_layers() if isinstance(layer, ALQActivation)][0]
    assert _np(act.initialized) == 1.0
    before = _state(model)
    model.fit(x[32:], y[32:], sample_weight=np.full(32, np.nan, "float32"), batch_size=32,
              epochs=1, verbose=0)
    skipped = opt.non_finite_steps if wrap == "alq" else opt.skipped_steps
    assert skipped == 1
    after = _state(model)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    model.fit(x[32:], y[32:], batch_size=32, epochs=1, verbose=0)   # a finite step moves them
    assert not np.array_equal(_np(act.gamma), before[act.gamma.path])


_REPLICATED = r"""
import json, sys, numpy as np, keras
sys.path.insert(0, {tests!r})
from alq_toys import toy_data, toy_model
from kquant.optimizers import ALQ

x, y = toy_data(96)
poison = np.ones(32, "float32")
poison[16:] = np.nan   # the second replica's half of the batch only

def run():
    keras.utils.set_random_seed(0)
    model = toy_model()
    model.compile(ALQ(learning_rate=0.01), keras.losses.SparseCategoricalCrossentropy(True),
                  jit_compile=JIT)
    return model

def state(model):
    return [np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in model.weights]

def comparable(model):   # α of (nearly) collinear bases splits by rounding: compare ŵ = Bα
    from kquant.alq.layers import alq_layers
    kept = [v for v in model.weights if not v.path.endswith("coordinates")]
    return state_of(kept) + [np.asarray(keras.ops.convert_to_numpy(layer.quantized_kernel()),
                                        "float64") for layer in alq_layers(model)]

def state_of(variables):
    return [np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in variables]

def local_copies(variable):   # every replica's copy of a (mirrored) variable
    value = variable.value
    if hasattr(value, "values"):
        return [np.asarray(v.numpy(), "float64") for v in value.values]
    return [np.asarray(keras.ops.convert_to_numpy(value), "float64")]

out = {{}}
for name, scope in (("one", ONE), ("replicas", REPLICAS)):
    with scope():
        model = run()
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, shuffle=False, verbose=0)
    before = state(model)
    model.fit(x[32:64], y[32:64], sample_weight=poison, batch_size=32, epochs=1, shuffle=False,
              verbose=0)
    out[name + "_skipped"] = model.optimizer.non_finite_steps
    out[name + "_moved"] = max(float(np.max(np.abs(a - b))) for a, b in zip(before, state(model)))
    model.fit(x[64:], y[64:], batch_size=32, epochs=1, shuffle=False, verbose=0)
    act = model.layers[-1].input_quantizer
    out[name + "_replica_spread"] = max(float(np.max(np.abs(c - copies[0])))
                                        for v in (act.reference, act.gamma)
                                        for copies in [local_copies(v)] for c in copies)
    out[name] = comparable(model)
out["diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(out.pop("one"), out.pop("replicas")))
print("JSON" + json.dumps(out))
"""


def _check_replicated(out):
    assert out["one_skipped"] == out["replicas_skipped"] == 1, out
    assert out["one_moved"] == 0.0 and out["replicas_moved"] == 0.0, out
    assert out["replicas_replica_spread"] == 0.0, out
    assert out["diff"] < 1e-5, out   # weights except α, and ŵ = Bα


@pytest.mark.slow
@pytest.mark.tf_only
def test_nan_on_one_replica_skips_statistics_on_every_replica_mirrored():
    """A NaN sample weight in one replica's slice: every replica keeps its statistics (the
    skip decision is global), and training then equals the one-device run."""
    import os

    from kquant.testing import json_result, run_replicated

    tests = os.path.dirname(__file__)
    _check_replicated(json_result(run_replicated(_REPLICATED.format(tests=tests), "mirrored")))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs on the JAX pass")
def test_nan_on_one_replica_skips_statistics_on_every_replica_data_parallel():
    import os

    from kquant.testing import json_result, run_replicated

    tests = os.path.dirname(__file__)
    _check_replicated(json_result(run_replicated(_REPLICATED.format(tests=tests),
                                                 "data_parallel")))
