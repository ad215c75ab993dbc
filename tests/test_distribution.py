"""Issue #12: every core kquant feature trains data-parallel exactly as on one device.

The matrix {MirroredStrategy on 2 logical CPUs (TF), keras.distribution.DataParallel
on 2 host devices (JAX)} × {ste, htge, dsq, ede, uniform learnable per-channel,
SkipNonFinite with a first-batch NaN}: each entry trains the same model from the
same seed on the same global batches, once on one device and once on two
replicas, in ONE subprocess per strategy (it prints JSON); the parametrized tests
read it through a module-scoped fixture. Data-initialised steps are reduced over
the replicas (:mod:`kquant.distribute`), so they, the weights and the
predictions agree within float tolerance.
"""

import keras
import numpy as np
import pytest

from kquant import distribute
from kquant.testing import json_result, run_on_two_cpus, run_replicated

BACKEND = keras.backend.backend()

ENTRIES = ["ste", "htge", "dsq", "ede", "uniform_per_channel", "skip_non_finite"]

# Shared by both strategies: ``REPLICAS`` is the strategy's context manager factory
# (MirroredStrategy scope, or the DataParallel distribution), ``ONE`` one device.
_SCENARIOS = r"""
import json, numpy as np, keras, kquant
from kquant.callbacks import EDESchedule
from kquant.optimizers import SkipNonFinite

STEPS, BATCH = 5, 32
(x_all, y_all), _ = kquant.datasets.load("digits")
X = x_all.reshape(len(x_all), -1)[: STEPS * BATCH].astype("float32")
Y = y_all[: STEPS * BATCH]

def uniform(bits, **kw):
    return kquant.quantizer("uniform", bits=bits, **kw)

def act(est="ste"):   # learnable asymmetric activation step, data-initialised
    return uniform(4, symmetric=False, estimator=est)

ENTRIES = {
    "ste": lambda: (kquant.quantizer("dorefa", bits=2, estimator="ste"), act("ste")),
    "htge": lambda: (uniform(2, estimator="htge"), act("htge")),
    "dsq": lambda: (uniform(3, estimator="dsq"), act("dsq")),
    "ede": lambda: (kquant.quantizer("sign", estimator="ede"), act("ste")),
    "uniform_per_channel": lambda: (uniform(4, per_channel=True), uniform(4, symmetric=False,
                                                                          per_channel=True)),
    "skip_non_finite": lambda: (uniform(3), act("ste")),
}

def model(entry, jit):
    keras.utils.set_random_seed(7)
    kq, iq = ENTRIES[entry]()
    m = keras.Sequential([
        keras.Input((64,)),
        kquant.QuantDense(32, kernel_quantizer=kq, input_quantizer=iq),
        keras.layers.ReLU(),
        kquant.QuantDense(10, kernel_quantizer=uniform(4)),
    ])
    # SGD with momentum: Adam's first steps are ≈ lr·sign(g), which turns float
    # round-off in a gradient that is exactly 0 in exact arithmetic into ±lr
    opt = keras.optimizers.SGD(0.05, momentum=0.9)
    if entry == "skip_non_finite":
        opt = SkipNonFinite(opt)
    m.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    return m

def train(m, entry):
    x, y = X, Y
    if entry == "skip_non_finite":   # the FIRST batch is non-finite, on the 2nd replica's half
        x = X.copy(); x[BATCH - 3, 5] = np.nan
    cb = [EDESchedule(update="batch")] if entry == "ede" else []
    m.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=cb)
    state = {f"{i}:" + "/".join(v.path.split("/")[1:]).split("_", 1)[-1] + ":" + v.name:
             np.asarray(keras.ops.convert_to_numpy(v.value), "float64").tolist()
             for i, v in enumerate(m.weights)}
    pred = np.asarray(m.predict(X[:64], batch_size=BATCH, verbose=0), "float64")
    skipped = m.optimizer.skipped_steps if entry == "skip_non_finite" else 0
    return state, pred, skipped

out = {}
for entry in ENTRIES:
    try:
        with ONE():
            m1 = model(entry, JIT)
            s1, p1, k1 = train(m1, entry)
        with REPLICAS():
            m2 = model(entry, JIT)
        s2, p2, k2 = train(m2, entry)
        diffs = {k: float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
                 for (k, a), b in zip(s1.items(), s2.values())}
        out[entry] = {"replicas": NREP, "weight_diff": diffs,
                      "pred_diff": float(np.max(np.abs(p1 - p2))),
                      "pred_scale": float(np.max(np.abs(p1))),
                      "finite": bool(np.isfinite(p2).all()), "skipped": [k1, k2],
                      "init": {k: v for k, v in s2.items() if k.endswith(("step_init", "initialized"))}}
    except Exception as e:  # report per entry; the tests show the error
        import traceback
        out[entry] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
print("JSON" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def mirrored_matrix():
    return json_result(run_replicated(_SCENARIOS, "mirrored", timeout=900))


@pytest.fixture(scope="module")
def data_parallel_matrix():
    return json_result(run_replicated(_SCENARIOS, "data_parallel", timeout=900))


def _check(result):
    assert "error" not in result, result.get("trace", result)
    assert result["replicas"] == 2
    assert result["finite"]
    worst = max(result["weight_diff"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-4, f"{worst[0]} differs by {worst[1]} from the one-device run"
    assert result["pred_diff"] < 1e-3 * max(1.0, result["pred_scale"]), result["pred_diff"]
    # every data-initialised step was set (from the global batch: equal above)
    flags = [v for k, v in result["init"].items() if k.endswith("initialized")]
    assert flags and all(f == 1.0 for f in flags), result["init"]


@pytest.mark.slow
@pytest.mark.tf_only
@pytest.mark.parametrize("entry", ENTRIES)
def test_mirrored_strategy_equals_one_device(mirrored_matrix, entry):
    result = mirrored_matrix[entry]
    _check(result)
    if entry == "skip_non_finite":
        assert result["skipped"] == [1, 1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(BACKEND != "jax", reason="JAX DataParallel entries run on the JAX pass")
@pytest.mark.parametrize("entry", ENTRIES)
def test_jax_data_parallel_equals_one_device(data_parallel_matrix, entry):
    result = data_parallel_matrix[entry]
    _check(result)
    if entry == "skip_non_finite":
        assert result["skipped"] == [1, 1]


# -- the helpers themselves, on one device (every backend) ------------------------
@pytest.mark.core
def test_global_mean_is_the_plain_mean_on_one_device():
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(distribute.global_mean(x, axis=0)),
                               x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(distribute.global_mean(x))),
                               x.mean(), rtol=1e-6)
    assert distribute.num_replicas_in_sync() == 1


@pytest.mark.core
@pytest.mark.parametrize("compiled", [False, True])
def test_global_sum_skip_returns_zeros_and_otherwise_the_mapped_sum(compiled):
    """``global_sum_and_count(x, axis, map, skip)``: ``Σ map(x)`` when ``skip`` is false,
    zeros of the reduced shape when true (the count either way), eager and compiled."""
    from keras import ops

    x = np.random.default_rng(1).normal(size=(6, 5)).astype("float32")

    def sums(x, skip):
        whole = distribute.global_sum_and_count(x, map=ops.abs, skip=skip)
        rows = distribute.global_sum_and_count(x, axis=0, map=lambda v: v * v, skip=skip)
        return whole[0], whole[1], rows[0], rows[1]

    fn = sums
    if compiled and BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(sums, jit_compile=True)
    elif compiled and BACKEND == "jax":
        import jax

        fn = jax.jit(sums)
    elif compiled:
        pytest.skip("torch: no compiled form to test here")
    for skip in (False, True):
        total, count, rows, rows_count = (ops.convert_to_numpy(v) for v in fn(
            ops.convert_to_tensor(x), ops.convert_to_tensor(skip)))
        np.testing.assert_allclose(total, 0.0 if skip else np.abs(x).sum(), rtol=1e-5)
        np.testing.assert_allclose(rows, np.zeros(5) if skip else (x * x).sum(0), rtol=1e-5)
        assert rows.shape == (5,) and float(count) == 30 and float(rows_count) == 6


@pytest.mark.tf_only
def test_skipped_global_sum_never_runs_its_map_in_tensorflow_outside_xla():
    """Where TensorFlow runs ops outside XLA a skipped sum does not compute ``map(x)``:
    eagerly the map is not called; in a graph it is traced once but, skipped, never
    executed. (Elsewhere it is computed and masked: see ``distribute.unless``.)"""
    import tensorflow as tf
    from keras import ops

    calls = []

    def counted(v):
        calls.append(1)
        return ops.abs(v)

    x = ops.convert_to_tensor(np.ones((4, 3), "float32"))
    distribute.global_sum_and_count(x, map=counted, skip=ops.convert_to_tensor(True))
    assert calls == []
    distribute.global_sum_and_count(x, map=counted, skip=ops.convert_to_tensor(False))
    assert calls == [1]
    ran = tf.Variable(0)

    def executed(v):   # counts executions, not traces
        ran.assign_add(1)
        return ops.abs(v)

    graph = tf.function(lambda x, skip: distribute.global_sum_and_count(
        x, map=executed, skip=skip)[0])
    for skip in (True, True, False):
        graph(x, tf.constant(skip))
    assert int(ran.numpy()) == 1


@pytest.mark.tf_only
def test_global_mean_reduces_unequal_replica_slices():
    """Mirrored on 2 CPUs, slices of 3 and 1 rows: the mean of all 4 rows on both (and,
    with ``skip``, 0 on both: the skipped sums are still all-reduced, in a graph)."""
    out = run_on_two_cpus("""
        import numpy as np, tensorflow as tf
        from kquant import distribute
        s = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        data = [np.array([[1.], [2.], [3.]], "float32"), np.array([[10.]], "float32")]
        values = s.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(data[ctx.replica_id_in_sync_group]))
        res = s.run(lambda x: (distribute.global_mean(x, axis=0), distribute.num_replicas_in_sync()),
                    args=(values,))
        means = [float(t.numpy()[0]) for t in s.experimental_local_results(res[0])]
        assert means == [4.0, 4.0], means
        for skip, want in ((False, 4.0), (True, 0.0)):   # the all-reduce outside the skip's loop
            got = s.run(tf.function(lambda x: distribute.global_mean(
                x, axis=0, map=tf.abs, skip=tf.constant(skip))), args=(values,))
            got = [float(t.numpy()[0]) for t in s.experimental_local_results(got)]
            assert got == [want, want], (skip, got)
        print("OK")
    """, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
