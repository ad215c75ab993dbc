"""Bop (Helwegen et al. 2019): the flip rule, training on digits, resume, NaN, distribution."""

import json

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant.optimizers import Bop, RoutingOptimizer, mark_binary

BACKEND = keras.backend.backend()
JIT = BACKEND != "torch"  # torch's jit_compile is torch.compile: minutes on CPU
QUICK_JIT = BACKEND == "jax"  # the quickest for a few steps: XLA on JAX, graph mode on TF


def _np(v):
    return ops.convert_to_numpy(v)


@pytest.mark.core
def test_bop_flips_exactly_the_weights_the_rule_says():
    # m ← (1−γ)m + γg ;  w ← −w where m·w > τ   (γ = 0.5, τ = 0.1)
    w = mark_binary(keras.Variable(np.array([1, -1, 1, -1, 1, -1], "float32")))
    latent = mark_binary(keras.Variable(np.array([0.3, -0.2, 0.0], "float32")))
    opt = Bop(threshold=0.1, gamma=0.5)
    g1 = np.array([0.4, 0.4, -0.4, -0.4, 0.1, 0.0], "float32")
    opt.apply([ops.convert_to_tensor(g1), ops.zeros(3)], [w, latent])
    # m1 = [.2, .2, -.2, -.2, .05, 0]; m1·w = [.2, -.2, -.2, .2, .05, 0] → flip 0 and 3
    np.testing.assert_array_equal(_np(w), [-1, -1, 1, 1, 1, -1])
    np.testing.assert_array_equal(_np(latent), [1, -1, 1])  # read as sign(w), sign(0) = +1
    assert opt.flip_ratio() == pytest.approx(2 / 9)
    g2 = np.array([0.4, 0.4, -0.4, -0.4, 0.3, 0.0], "float32")
    opt.apply([ops.convert_to_tensor(g2), ops.zeros(3)], [w, latent])
    # m2 = [.3, .3, -.3, -.3, .175, 0]; m2·w1 = [-.3, -.3, -.3, -.3, .175, 0] → flip 4 only
    np.testing.assert_array_equal(_np(w), [-1, -1, 1, 1, -1, -1])
    m1 = np.float32(0.5) * g1
    m2 = m1 + np.float32(0.5) * (g2 - m1)
    np.testing.assert_allclose(_np(opt._momentums[0]), m2, rtol=1e-7)
    assert opt.flip_ratio() == pytest.approx(1 / 9)
    assert int(_np(opt.iterations)) == 2


@pytest.mark.core
def test_bop_refuses_non_binary_variables_and_bad_hyperparameters():
    w = keras.Variable(np.ones(3, "float32"), name="plain_weight")
    with pytest.raises(ValueError, match=r"non-binary variable\(s\) \['plain_weight'\].*RoutingOptimizer"):
        Bop().apply([ops.ones(3)], [w])
    for kwargs, message in [({"gamma": 0.0}, "`gamma` must be a finite number in \\(0.0, 1.0\\]"),
                            ({"gamma": 2.0}, "`gamma`"), ({"threshold": -1.0}, "`threshold`"),
                            ({"threshold": float("nan")}, "`threshold`"),
                            ({"weight_decay": 1e-4}, "`weight_decay`"),
                            ({"learning_rate": 1e-3}, "its rate is `gamma`")]:
        with pytest.raises(ValueError, match=message):
            Bop(**kwargs)


def binary_mlp(norm="batch", seed=0):
    """Flatten → binary Dense(64) → norm → tanh → binary Dense(10) → norm (logits)."""
    keras.utils.set_random_seed(seed)
    norm_layer = (keras.layers.BatchNormalization if norm == "batch"
                  else keras.layers.LayerNormalization)
    return keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        kquant.QuantDense(64, kernel_quantizer="sign", use_bias=False), norm_layer(),
        keras.layers.Activation("tanh"),
        kquant.QuantDense(10, kernel_quantizer="sign", use_bias=False), norm_layer(),
    ])


def compile_bop(model, gamma=1e-3, threshold=1e-6, lr=1e-2, jit_compile=None):
    """Bop on the binary kernels, Adam on the rest, under SkipNonFinite (as ``kquant fit``)."""
    model.compile(
        optimizer=kquant.optimizers.for_training("bop", lr, gamma=gamma, threshold=threshold),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"], jit_compile=JIT if jit_compile is None else jit_compile)
    return model


@pytest.mark.slow
@pytest.mark.skipif(BACKEND == "torch", reason="jit_compile training; torch runs the core tests")
def test_bop_trains_a_binary_net_on_digits_and_flips_fewer_as_gamma_decays():
    (x, y), (xt, yt) = kquant.datasets.load("digits")
    steps = int(np.ceil(len(x) / 64))
    gamma = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=steps, decay_rate=0.3)
    model = compile_bop(binary_mlp(), gamma=gamma)
    flips = kquant.callbacks.FlipRatio()
    history = model.fit(x, y, epochs=4, batch_size=64, verbose=0, callbacks=[flips])
    bop = model.optimizer.inner_optimizer.routes[0][1]
    assert isinstance(bop, Bop)
    for layer in (model.layers[1], model.layers[4]):  # no latent weights: the kernels are ±1
        assert set(np.unique(_np(layer.kernel)).tolist()) == {-1.0, 1.0}
    acc = history.history["accuracy"]
    assert acc[-1] > acc[0] and acc[-1] > 0.9, acc
    assert model.evaluate(xt, yt, verbose=0)[1] > 0.85
    ratio = history.history["flip_ratio"]  # mean share of kernel bits flipped per step
    assert ratio[-1] < ratio[0] / 4, ratio
    # Bop's own count of the last step agrees with the callback's count of changed bits
    assert bop.flip_ratio() == pytest.approx(flips.history[-1], abs=1e-9)


def _state(model):
    return ([_np(v) for v in model.weights], [_np(v) for v in model.optimizer.variables])


@pytest.mark.core
def test_bop_routing_resumes_identically_after_save_and_load(tmp_path):
    (x, y), _ = kquant.datasets.load("digits")
    x, y = x[:96], y[:96]
    straight = compile_bop(binary_mlp(), gamma=1e-2, jit_compile=QUICK_JIT)
    straight.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)

    first = compile_bop(binary_mlp(), gamma=1e-2, jit_compile=QUICK_JIT)
    first.fit(x[:64], y[:64], batch_size=32, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "bop.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    opt = resumed.optimizer
    assert isinstance(opt.inner_optimizer, RoutingOptimizer)
    assert [type(o).__name__ for o in opt.inner_optimizer.optimizers] == ["Bop", "Adam"]
    for a, b in zip(_state(first)[1], _state(resumed)[1]):
        np.testing.assert_array_equal(a, b)  # optimizer state restored exactly
    resumed.fit(x[64:], y[64:], batch_size=32, epochs=1, shuffle=False, verbose=0)

    (w1, o1), (w2, o2) = _state(straight), _state(resumed)
    assert len(o1) == len(o2) and len(w1) == len(w2)
    for a, b in zip(w1 + o1, w2 + o2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(w1[0], w2[0])  # binary kernels: identical bits
    assert int(_np(opt.iterations)) == 3


@pytest.mark.core
def test_bop_routing_skips_a_nan_batch_without_touching_state():
    (x, y), _ = kquant.datasets.load("digits")
    model = compile_bop(binary_mlp(norm="layer"), gamma=1e-2, jit_compile=QUICK_JIT)
    model.fit(x[:32], y[:32], batch_size=32, verbose=0)
    opt = model.optimizer

    def state():  # weights and all optimizer state but the skip counter
        return [_np(v) for v in model.weights] + [
            _np(v) for v in opt.variables if v is not opt.step_counter]

    before = state()
    bad = x[32:64].copy()
    bad[0, 0, 0, 0] = np.nan
    model.fit(bad, y[32:64], batch_size=32, verbose=0)
    assert opt.skipped_steps == 1
    for a, b in zip(before, state(), strict=True):
        np.testing.assert_array_equal(a, b)
    model.fit(x[64:96], y[64:96], batch_size=32, verbose=0)
    assert not np.array_equal(before[0], _np(model.weights[0]))  # training goes on


@pytest.mark.skipif(BACKEND == "torch", reason="mixed_float16 is checked on TF and JAX")
def test_bop_routing_under_mixed_precision():
    (x, y), _ = kquant.datasets.load("digits")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_bop(binary_mlp(), gamma=1e-2)
        history = model.fit(x[:128], y[:128], batch_size=32, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(history.history["loss"]))
    kernel = model.layers[1].kernel
    assert kernel.dtype == "float32"
    assert set(np.unique(_np(kernel)).tolist()) == {-1.0, 1.0}
    assert history.history["loss"][-1] < history.history["loss"][0]


DISTRIBUTED = """
import json, sys
sys.path.insert(0, TESTS_DIR)
import numpy as np
import keras
import kquant
import test_bop
from test_bop import binary_mlp, compile_bop

(x, y), _ = kquant.datasets.load("digits")
x, y = x[:256], y[:256]

def run():
    model = compile_bop(binary_mlp(norm="layer"), gamma=1e-2)
    start = keras.ops.convert_to_numpy(model.layers[1].kernel)
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    return start, [keras.ops.convert_to_numpy(v) for v in model.weights]

SETUP
start, single = run()
DISTRIBUTED_RUN
print(json.dumps({
    "replicas": REPLICAS,
    "flipped": int(np.sum(np.sign(start) != single[0])),
    "bits_differ": int(np.sum(single[0] != replicated[0])),
    "max_diff": float(max(np.max(np.abs(a - b)) for a, b in zip(single, replicated))),
}))
"""


def _script(**parts):
    import os

    script = DISTRIBUTED.replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))
    for key, value in parts.items():
        script = script.replace(key, value)
    return script


def _check_distributed(result):
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["flipped"] > 0, out  # Bop did flip weights in the 4 steps
    assert out["bits_differ"] == 0, out
    assert out["max_diff"] < 1e-4, out


@pytest.mark.tf_only
def test_bop_routing_under_mirrored_strategy_matches_one_device():
    from kquant.testing import run_on_two_cpus

    script = _script(
        SETUP="import tensorflow as tf\ntest_bop.JIT = False  # MirroredStrategy: no jit_compile",
        DISTRIBUTED_RUN="strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])\n"
                        "with strategy.scope():\n    _, replicated = run()",
        REPLICAS="strategy.num_replicas_in_sync")
    _check_distributed(run_on_two_cpus(script, timeout=300))


@pytest.mark.distributed
@pytest.mark.skipif(BACKEND != "jax", reason="runs in the JAX pass of the suite")
def test_bop_routing_under_jax_data_parallel_matches_one_device():
    from kquant.testing import run_on_two_jax_devices

    script = _script(
        SETUP="dp = keras.distribution.distribution()\nkeras.distribution.set_distribution(None)",
        DISTRIBUTED_RUN="keras.distribution.set_distribution(dp)\n_, replicated = run()",
        REPLICAS="len(dp.device_mesh.devices.flatten())")
    _check_distributed(run_on_two_jax_devices(script, timeout=300))
