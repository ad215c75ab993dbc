"""kquant.optimizers.ALQ: steps against NumPy references, fit/jit/JAX, NaN guard, distribution."""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from kquant.alq import ALQConv2D, ALQDense, steps
from kquant.optimizers import ALQ
from kquant.testing import xla_launches

B1, B2, EPS = 0.9, 0.999, 1e-8


def _two_logical_cpus():
    """Split the CPU in two logical devices for MirroredStrategy (before TF initialises)."""
    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    try:
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass  # runtime already initialised: the mirrored test skips itself


_two_logical_cpus()


def _layer(units=3, inputs=8, **kw):
    layer = ALQDense(units, max_bits=3, group=4, **kw)
    layer.build((None, inputs))
    return layer


def _np(v):
    return np.asarray(ops.convert_to_numpy(v), dtype=np.float64)


def _grads_for(layer, grad_kernel):
    grads = []
    for v in layer.trainable_variables:
        if v is layer.kernel_tap:
            grads.append(ops.convert_to_tensor(grad_kernel.astype("float32")))
        else:
            grads.append(ops.zeros(v.shape))
    return grads


def test_bases_phase_step_equals_numpy_reference():
    layer = _layer()
    opt = ALQ(learning_rate=0.05, phase="bases")
    gk = np.random.default_rng(0).normal(size=(8, 3))
    bases, alpha, mask = (_np(v) for v in layer.alq_state())
    opt.apply(_grads_for(layer, gk), layer.trainable_variables)
    g_w = layer.layout.to_groups_numpy(gk)
    m, v = (1 - B1) * g_w, (1 - B2) * g_w**2
    g, h = 0.05 * m / (1 - B1), (np.sqrt(v) + EPS) / np.sqrt(1 - B2)
    t = lambda a: ops.convert_to_tensor(np.asarray(a, "float32"))  # noqa: E731
    eb, ea = steps.bases_step(t(bases), t(alpha), t(mask), t(g), t(h), ridge=1e-6)
    np.testing.assert_array_equal(_np(layer.bases), _np(eb))
    got, want, nb = _np(layer.coordinates), _np(ea), _np(eb)
    # ŵ = Bα everywhere; α itself where the active bases are independent (two equal
    # columns split their coefficient sum by rounding: the refit's summation order)
    np.testing.assert_allclose(np.einsum("gni,gi->gn", nb, got), np.einsum("gni,gi->gn", nb, want),
                               rtol=1e-5, atol=1e-6)
    independent = [np.linalg.matrix_rank(nb[i][:, mask[i] > 0]) == (mask[i] > 0).sum()
                   for i in range(nb.shape[0])]
    assert sum(independent) >= nb.shape[0] // 2, independent
    np.testing.assert_allclose(got[independent], want[independent], rtol=1e-5, atol=1e-6)
    assert not np.allclose(_np(layer.coordinates), alpha)  # it did move
    np.testing.assert_array_equal(_np(layer.kernel_tap), 0.0)  # the tap never moves


def test_coordinates_phase_is_amsgrad_on_alpha_with_flips():
    layer = _layer()
    opt = ALQ(learning_rate=0.01, phase="coordinates", coordinate_l2=0.0)
    rng = np.random.default_rng(1)
    bases, alpha, mask = (_np(v) for v in layer.alq_state())
    m = v = vmax = np.zeros_like(alpha)
    for step in range(1, 4):
        gk = rng.normal(size=(8, 3))
        opt.apply(_grads_for(layer, gk), layer.trainable_variables)
        g_a = np.einsum("gni,gn->gi", bases, layer.layout.to_groups_numpy(gk)) * mask
        m = B1 * m + (1 - B1) * g_a
        v = B2 * v + (1 - B2) * g_a**2
        vmax = np.maximum(vmax, v)
        alpha = (alpha - 0.01 * (m / (1 - B1**step)) /
                 (np.sqrt(vmax) / np.sqrt(1 - B2**step) + EPS)) * mask
        sign = np.where(alpha < 0, -1.0, 1.0)
        alpha, bases, m = alpha * sign, bases * sign[:, None, :], m * sign
    np.testing.assert_allclose(_np(layer.coordinates), alpha, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(_np(layer.bases), bases)


def test_inner_adam_trains_bias():
    layer = _layer()
    opt = ALQ(learning_rate=0.1)
    grads = _grads_for(layer, np.zeros((8, 3)))
    grads[[v is layer.bias for v in layer.trainable_variables].index(True)] = ops.ones((3,))
    opt.apply(grads, layer.trainable_variables)
    # Adam's first step is lr·sign(g).
    np.testing.assert_allclose(_np(layer.bias), -0.1 * np.ones(3), rtol=1e-5)


def test_non_finite_gradient_skips_and_warns_once():
    layer = _layer()
    opt = ALQ(learning_rate=0.1)
    before = [_np(v) for v in layer.alq_state()]
    gk = np.ones((8, 3))
    gk[0, 0] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.apply(_grads_for(layer, gk), layer.trainable_variables)
        gk[0, 0] = np.inf
        opt.apply(_grads_for(layer, gk), layer.trainable_variables)
    assert sum("NaN/inf" in str(w.message) for w in caught) == 1
    assert opt.non_finite_steps == 2
    for b, a in zip(before, layer.alq_state()):
        np.testing.assert_array_equal(_np(a), b)
    slots = opt.alpha_moments(layer)
    assert all(np.all(_np(s) == 0) for s in slots)
    opt.apply(_grads_for(layer, np.ones((8, 3))), layer.trainable_variables)  # recovers
    assert not np.array_equal(_np(layer.coordinates), before[1])


def test_invalid_configs_name_the_argument():
    with pytest.raises(ValueError, match="max_bits"):
        ALQDense(3, max_bits=0)
    with pytest.raises(ValueError, match="max_bits"):
        ALQDense(3, max_bits=9)
    with pytest.raises(ValueError, match="group"):
        ALQDense(3, group="diagonal")
    with pytest.raises(ValueError, match="does not divide"):
        ALQDense(3, group=5).build((None, 8))
    with pytest.raises(ValueError, match="phase"):
        ALQ(phase="latent")
    with pytest.raises(ValueError, match="beta_1"):
        ALQ(beta_1=1.5)


def _data(n=64):
    rng = np.random.default_rng(2)
    x = rng.random((n, 6, 6, 2)).astype("float32")
    y = (x[:, :3].mean(axis=(1, 2, 3)) > x[:, 3:].mean(axis=(1, 2, 3))).astype("int32")
    return x, y


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 2))
    h = ALQConv2D(4, 3, padding="same", activation="relu", max_bits=3)(inputs)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, ALQDense(2, max_bits=3, group=16)(h))


@pytest.mark.parametrize("jit", [
    pytest.param(False, marks=pytest.mark.tf_only),  # un-jitted JAX runs op by op: minutes
    True,
])
def test_fit_lowers_loss_in_both_phases(jit):
    x, y = _data()
    model = _model()
    model.compile(ALQ(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    loss0 = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    loss1 = model.evaluate(x, y, verbose=0)
    model.optimizer.phase = "coordinates"
    model.optimizer.learning_rate.assign(1e-2)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    loss2 = model.evaluate(x, y, verbose=0)
    assert loss1 < loss0 and loss2 < loss1, (loss0, loss1, loss2)
    for layer in model.layers:
        if hasattr(layer, "bases"):
            assert set(np.unique(_np(layer.bases))) <= {-1.0, 1.0}
            assert (_np(layer.coordinates) >= 0).all()


def test_prune_phase_holds_state():
    x, y = _data(32)
    model = _model()
    model.compile(ALQ(1e-2, phase="prune"), keras.losses.SparseCategoricalCrossentropy(True))
    before = [_np(v) for v in model.layers[1].alq_state()]
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    for b, a in zip(before, model.layers[1].alq_state()):
        np.testing.assert_array_equal(_np(a), b)
    assert np.abs(_np(model.optimizer.alpha_moments(model.layers[1])[0])).sum() > 0


@pytest.mark.tf_only
def test_mirrored_strategy_matches_single_replica():
    import tensorflow as tf

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("TF runtime already initialised with one logical CPU")
    x, y = _data()

    def run(strategy):
        with strategy.scope():
            model = _model()
            model.compile(ALQ(1e-2), keras.losses.SparseCategoricalCrossentropy(True))
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
        model.optimizer.phase = "coordinates"
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False)
        kernels = [_np(layer.kernel) for layer in model.layers if hasattr(layer, "bases")]
        return kernels, [_np(w) for w in model.weights], _np(model.predict(x, verbose=0))

    single = run(tf.distribute.get_strategy())
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    for a, b in zip(single[0], mirrored[0]):   # the quantized kernels ŵ = Bα
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(single[2], mirrored[2], atol=1e-4)
    # α itself only loosely: where a group's basis columns are (nearly) collinear, the
    # Eq. 23 refit splits their sum by the all-reduce's rounding
    for a, b in zip(single[1], mirrored[1]):
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_bases_phase_flips_alpha_first_moment_with_alpha():
    """Issue #10: when the Eq. 23 refit gives α_i < 0, β_i and α_i flip, and so must m_α,i."""
    layer = ALQDense(1, max_bits=2, use_bias=False)
    layer.build((None, 3))  # one group of n = 3
    layer.bases.assign(ops.cast(np.array([[[-1.0, 1.0], [1.0, -1.0], [1.0, -1.0]]], "float32"),
                                layer.bases.dtype))
    layer.coordinates.assign(np.array([[0.377522, 0.576125]], "float32"))
    layer.mask.assign(np.ones((1, 2), "float32"))
    lr = 0.1
    opt = ALQ(learning_rate=lr, phase="bases", coordinate_l2=0.0)
    opt.build(layer.trainable_variables)
    g_target = np.array([[0.047216, -0.004536, -1.060894]])
    h_target = np.array([[0.238706, 44.666382, 8.48056]])
    w_m, _, w_vmax = opt.weight_moments(layer)
    a_m = opt.alpha_moments(layer)[0]
    w_m.assign((g_target * (1 - B1) / (lr * B1)).astype("float32"))  # g = a·m̂ after one step
    w_vmax.assign(((h_target * np.sqrt(1 - B2)) ** 2).astype("float32"))  # H = √v̂ / √(1 − β₂)
    a_m.assign(np.ones((1, 2), "float32"))
    bases, alpha, mask = (_np(v) for v in layer.alq_state())
    m, vmax = B1 * _np(w_m), _np(w_vmax)
    g, h = lr * m / (1 - B1), (np.sqrt(vmax) + EPS) / np.sqrt(1 - B2)
    t = lambda a: ops.convert_to_tensor(np.asarray(a, "float32"))  # noqa: E731
    eb, _, em = steps.bases_step(t(bases), t(alpha), t(mask), t(g), t(h), 1e-6,
                                  moments=(t(B1 * np.ones((1, 2))),))
    expected_m = _np(em)
    assert (expected_m < 0).any(), "the test case must make some α flip"
    opt.apply(_grads_for(layer, np.zeros((3, 1))), layer.trainable_variables)
    # Same new bases (so the same flips); α itself is not compared: these bases' columns are
    # collinear, so the split of α between them rests on the ridge and on float rounding.
    np.testing.assert_array_equal(_np(layer.bases), _np(eb))
    assert (_np(layer.coordinates) >= 0).all()
    np.testing.assert_allclose(_np(a_m), expected_m, rtol=1e-6)


def test_step_guard_is_per_step_not_per_layer():
    """Issue #12: a NaN in one layer's gradient skips every variable of the step."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), ALQDense(4, max_bits=3, group=4),
                              ALQDense(2, max_bits=3, group=4)])
    opt = ALQ(learning_rate=0.05)
    variables = model.trainable_variables
    opt.build(variables)
    before = [_np(v) for v in variables] + [_np(v) for v in opt.variables]
    rng = np.random.default_rng(0)
    grads = [ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in variables]
    first_tap = [i for i, v in enumerate(variables) if v is model.layers[0].kernel_tap][0]
    poisoned = np.array(ops.convert_to_numpy(grads[first_tap]))
    poisoned[0, 0] = np.nan
    grads[first_tap] = ops.convert_to_tensor(poisoned)
    opt.apply(grads, variables)
    after = [_np(v) for v in variables] + [_np(v) for v in opt.variables]
    skipped = opt.non_finite_steps
    for name, a, b in zip([v.path for v in variables] + [v.path for v in opt.variables],
                          before, after):
        if "non_finite_steps" in name:
            continue
        np.testing.assert_array_equal(b, a, err_msg=name)  # biases, B/α, moments, iterations
    assert skipped == 1


def _guard_case(clipvalue=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), ALQDense(4, max_bits=3, group=4),
                              ALQDense(2, max_bits=3, group=4)])
    opt = ALQ(learning_rate=0.05, clipvalue=clipvalue)
    variables = model.trainable_variables
    opt.build(variables)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    return model, opt, variables, grads


def _graph_apply(opt, variables):
    """``opt.apply`` traced into a TensorFlow graph without XLA."""
    import tensorflow as tf

    return tf.function(lambda *grads: opt.apply(list(grads), variables))


@pytest.mark.tf_only
def test_graph_update_is_one_xla_launch_equal_to_the_eager_update():
    """A TensorFlow train step without XLA runs the whole ALQ update (every layer, the
    inner Adam, the guard) as one XLA launch, with the eager per-variable update's result."""
    import tensorflow as tf

    results = []
    for mode in ("eager", "graph"):
        _, opt, variables, grads = _guard_case()
        for step in range(3):
            opt.phase = ("bases", "coordinates", "bases")[step]
            tensors = [tf.constant(g * (step + 1)) for g in grads]
            if mode == "eager":
                opt.apply(tensors, variables)
            else:
                fn = _graph_apply(opt, variables)
                assert xla_launches(fn.get_concrete_function(*tensors).graph) == 1
                fn(*tensors)
        results.append([_np(v) for v in variables] + [_np(v) for v in opt.variables])
    for eager, graph in zip(*results):
        np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.tf_only
@pytest.mark.parametrize("bad, clipvalue", [(np.nan, None), (np.inf, None), (np.inf, 0.5)])
def test_graph_update_skips_a_non_finite_step_whole(bad, clipvalue):
    """The guard of the one-launch update sees what :meth:`ALQ.apply` saw: an inf that
    ``clipvalue`` would clip to a finite value still skips the step."""
    import tensorflow as tf

    _, opt, variables, grads = _guard_case(clipvalue)
    before = [_np(v) for v in variables] + [_np(v) for v in opt.variables]
    grads[0][0, 0] = bad
    _graph_apply(opt, variables)(*[tf.constant(g) for g in grads])
    after = [_np(v) for v in variables] + [_np(v) for v in opt.variables]
    names = [v.path for v in variables] + [v.path for v in opt.variables]
    for name, a, b in zip(names, before, after):
        if "non_finite_steps" not in name:
            np.testing.assert_array_equal(b, a, err_msg=name)
    assert opt.non_finite_steps == 1


@pytest.mark.tf_only
def test_training_graph_decodes_the_kernel_in_one_xla_launch():
    """Without XLA, a training call decodes ``B α`` in one XLA launch with the same
    output and the same tap gradient; an inference graph (what exporters read) has none."""
    import tensorflow as tf

    layer = ALQConv2D(4, 3, max_bits=3, group="kernel")
    layer.build((None, 6, 6, 2))
    rng = np.random.default_rng(3)
    layer.set_float_kernel(rng.normal(size=(3, 3, 2, 4)).astype("float32"))
    x = tf.constant(rng.normal(size=(2, 6, 6, 2)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, 4, 4, 4)).astype("float32"))

    def loss_and_tap_gradient(training):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=training) * upstream)
        return loss, tape.gradient(loss, layer.kernel_tap.value)

    want = [_np(v) for v in loss_and_tap_gradient(True)]            # eager: plain ops
    kernel = _np(layer.kernel)
    want_tap = _np(tf.compat.v1.nn.conv2d_backprop_filter(x, kernel.shape, upstream,
                                                          [1, 1, 1, 1], "VALID"))
    np.testing.assert_allclose(want[1], want_tap, rtol=1e-5, atol=1e-5)
    for training, launches in ((True, 1), (False, 0)):
        fn = tf.function(lambda training=training: loss_and_tap_gradient(training))
        assert xla_launches(fn.get_concrete_function().graph) == launches
        got = [_np(v) for v in fn()]
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
