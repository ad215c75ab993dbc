"""TWN, BitNet and PACT train on 2 replicas exactly as on one device; stochastic
binarization trains on 2 replicas under jit (its SeedGenerator state is a variable).

TF: MirroredStrategy on 2 logical CPUs; JAX: keras.distribution.DataParallel on 2
host devices (with jit_compile). One subprocess per strategy prints JSON.
"""

import keras
import pytest

from kquant.testing import json_result, run_replicated

_SCRIPT = r"""
import json, numpy as np, keras, kquant

(x_all, y_all), _ = kquant.datasets.load("digits")
X = x_all.reshape(len(x_all), -1)[:128].astype("float32")
Y = y_all[:128]

def model(stochastic):
    keras.utils.set_random_seed(7)
    middle = kquant.quantizer("stochastic_sign", seed=3) if stochastic else "bitnet"
    m = keras.Sequential([
        keras.Input((64,)),
        kquant.QuantDense(32, kernel_quantizer="twn",
                          input_quantizer=kquant.quantizer("pact", bits=4, alpha=1.0)),
        keras.layers.ReLU(),
        kquant.QuantDense(32, kernel_quantizer=middle),
        keras.layers.ReLU(),
        kquant.QuantDense(10, kernel_quantizer="bitnet"),
    ])
    m.compile(keras.optimizers.SGD(0.05, momentum=0.9),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
    return m

def train(m):
    loss = m.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0).history["loss"]
    weights = [np.asarray(keras.ops.convert_to_numpy(v), "float64") for v in m.trainable_weights]
    return loss, weights, np.asarray(m.predict(X[:32], verbose=0), "float64")

out = {}
with ONE():
    l1, w1, p1 = train(model(False))
with REPLICAS():
    m2 = model(False)
l2, w2, p2 = train(m2)
out["weight_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2))
out["pred_diff"] = float(np.max(np.abs(p1 - p2)))
with REPLICAS():
    ms = model(True)
ls, _, ps = train(ms)
out["stochastic_loss"] = ls
out["stochastic_finite"] = bool(np.isfinite(ps).all())
print("JSON" + json.dumps(out))
"""

def _check(proc):
    out = json_result(proc)
    assert out["weight_diff"] < 1e-4, out
    assert out["pred_diff"] < 1e-3, out
    assert out["stochastic_finite"] and out["stochastic_loss"][-1] < out["stochastic_loss"][0], out


@pytest.mark.slow
@pytest.mark.tf_only
def test_new_quantizers_under_mirrored_strategy():
    _check(run_replicated(_SCRIPT, "mirrored"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs on the JAX pass")
def test_new_quantizers_under_jax_data_parallel():
    _check(run_replicated(_SCRIPT, "data_parallel"))


_SAME_NOISE = r"""
import json, numpy as np, tensorflow as tf, kquant

w = np.random.default_rng(0).uniform(-1.2, 1.2, (64, 32)).astype("float32")
q1 = kquant.quantizer("stochastic_sign", seed=3)
q1.build(w.shape)
one = [np.asarray(q1(tf.constant(w), training=True)) for _ in range(2)]
with REPLICAS():
    q2 = kquant.quantizer("stochastic_sign", seed=3)
    q2.build(w.shape)
step = tf.function(lambda: q2(tf.constant(w), training=True))
draws = [[np.asarray(v) for v in STRATEGY.experimental_local_results(STRATEGY.run(step))]
         for _ in range(2)]
print("JSON" + json.dumps({
    "replicas_agree": all(np.array_equal(d[0], d[i]) for d in draws for i in range(len(d))),
    "equal_one_device": all(np.array_equal(d[0], o) for d, o in zip(draws, one)),
    "fresh_per_step": not np.array_equal(draws[0][0], draws[1][0]),
    "n": len(draws[0]),
}))
"""


@pytest.mark.slow
@pytest.mark.tf_only
def test_stochastic_noise_is_the_same_on_every_mirrored_replica():
    """A mirrored kernel is quantized alike on every replica: each replica's counter
    noise (``kquant.noise``, TensorFlow ops under a strategy) comes from the one mirrored
    seed state, equals the one-device draw step by step, and is fresh each step."""
    out = json_result(run_replicated(_SAME_NOISE, "mirrored"))
    assert out == {"replicas_agree": True, "equal_one_device": True, "fresh_per_step": True,
                   "n": 2}, out
