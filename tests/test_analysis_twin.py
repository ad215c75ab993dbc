"""to_ste: the STE twin trains like the Q̂ net (Theorem 5.1), and is a complete, saveable model."""

import math

import keras
import numpy as np
import pytest

import kquant
from kquant.testing import variable_grads
from kquant import analysis

T_HTGE, STEP = 3.0, 0.2  # 2-bit symmetric: levels −0.4, −0.2, 0, 0.2


def closed_alpha(t):
    return t * t / (t + math.sinh(t))


def closed_m(x, t=T_HTGE, step=STEP, lo=-2, hi=1):
    """Closed-form M for HTGE inside the range (see test_analysis_equivalence)."""
    z = x / step
    b = np.clip(np.floor(z) + 0.5, lo + 0.5, hi - 0.5)
    s = 2 * (z - b)
    return step * (b + closed_alpha(t) / 2 * (s + np.sinh(t * s) / t) / t)


def htge_uniform(t=T_HTGE, step=STEP):
    return kquant.quantizers.Uniform(bits=2, step=step, estimator={"name": "htge", "config": {"t": t}})


def small_net(seed=0, t=T_HTGE):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = kquant.QuantDense(8, kernel_quantizer=htge_uniform(t), activation="relu")(inputs)
    outputs = kquant.QuantDense(3, kernel_quantizer=htge_uniform(t))(h)
    return keras.Model(inputs, outputs)


def kernels(model):
    return [keras.ops.convert_to_numpy(l.latent_kernel) for l in analysis.quantized_layers(model)]


def test_sgd_twin_maps_weights_scales_lr_and_switches_to_pwl():
    model = small_net()
    twin = analysis.to_ste(model, keras.optimizers.SGD(0.05, momentum=0.9))
    assert not twin.adaptive
    assert twin.alpha == pytest.approx(closed_alpha(T_HTGE), rel=1e-5)
    # α rides on the kernels' estimator; the optimizer keeps η for everything else
    assert float(twin.optimizer.get_config()["learning_rate"]) == pytest.approx(0.05, rel=1e-6)
    assert twin.optimizer.get_config()["momentum"] == 0.9
    for k_q, k_s in zip(kernels(model), kernels(twin.model)):
        inside = np.abs(k_q / STEP + 0.5) <= 1.5  # within [−0.4, 0.2]: closed form applies
        np.testing.assert_allclose(k_s[inside], closed_m(k_q.astype("float64"))[inside], atol=1e-6)
    for layer in analysis.quantized_layers(twin.model):
        est = layer.kernel_quantizer.estimator
        assert isinstance(est, analysis.ScaledEstimator)
        assert est.scale == pytest.approx(twin.alpha)
        assert kquant.estimators.serialize(est.inner) == {"name": "clipped_ste", "config": {"clip": 1.0}}
    # M preserves bins: both nets compute the same function at the start.
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), twin.model.predict(x, verbose=0))
    assert analysis.weight_agreement(model, twin.model) == 1.0
    assert analysis.alignment_error(model, twin.model, mapped=True) < 1e-7
    assert analysis.alignment_error(model, twin.model, mapped=False) > 1e-3


def test_adam_twin_keeps_weights_and_lr():
    model = small_net()
    opt = keras.optimizers.Adam(1e-3, beta_2=0.95)
    model_s, opt_s = analysis.to_ste(model, opt)
    assert float(opt_s.get_config()["learning_rate"]) == pytest.approx(1e-3)
    assert opt_s.get_config()["beta_2"] == 0.95
    for a, b in zip(model.get_weights(), model_s.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_schedules_are_scaled_and_serialize():
    sched = keras.optimizers.schedules.CosineDecay(0.0, 90, warmup_target=0.1, warmup_steps=10)
    scaled = analysis.scale_learning_rate(keras.optimizers.SGD(sched), 0.7)
    scaled = keras.optimizers.schedules.deserialize(scaled.get_config()["learning_rate"])
    for step in (0, 5, 10, 50):
        assert float(scaled(step)) == pytest.approx(0.7 * float(sched(step)), rel=1e-6)
    assert isinstance(scaled, analysis.ScaledSchedule)
    twin = analysis.to_ste(small_net(), keras.optimizers.SGD(sched))   # the schedule is kept
    kept = keras.optimizers.schedules.deserialize(twin.optimizer.get_config()["learning_rate"])
    assert float(kept(50)) == pytest.approx(float(sched(50)), rel=1e-6)


def test_sgd_twin_scales_the_kernels_learning_rate_only():
    """Theorem 5.1 concerns the quantized kernels: one SGD step of the twin moves each
    kernel by α·η·g (PWL gradient) and every bias by η·g, exactly."""
    model = small_net()
    twin = analysis.to_ste(model, keras.optimizers.SGD(0.05))
    net = twin.model
    x = np.random.default_rng(2).normal(size=(8, 6)).astype("float32")
    y = np.random.default_rng(3).normal(size=(8, 3)).astype("float32")
    net.compile(twin.optimizer, "mse")
    layers = analysis.quantized_layers(net)
    variables = [l.latent_kernel for l in layers] + [l.bias for l in layers]
    before = [keras.ops.convert_to_numpy(v) for v in variables]
    grads = variable_grads(variables, lambda: keras.ops.mean(keras.ops.square(net(x, training=True) - y)))
    # the PWL gradient itself, without α: the same net with plain clipped_ste kernels
    for layer in layers:
        layer.kernel_quantizer.estimator.scale = 1.0
    plain = variable_grads(variables, lambda: keras.ops.mean(keras.ops.square(net(x, training=True) - y)))
    for layer in layers:
        layer.kernel_quantizer.estimator.scale = twin.alpha
    n = len(layers)
    for g, p in zip(grads[:n], plain[:n]):
        np.testing.assert_allclose(g, twin.alpha * p, rtol=1e-5, atol=1e-8)
    for g, p in zip(grads[n:], plain[n:]):
        np.testing.assert_allclose(g, p, rtol=1e-6, atol=1e-8)
    net.train_on_batch(x, y)
    after = [keras.ops.convert_to_numpy(v) for v in variables]
    for b, a, g in zip(before, after, grads):
        np.testing.assert_allclose(b - a, 0.05 * g, rtol=1e-4, atol=1e-7)
    assert twin.alpha < 0.9   # so kernels (α·η) and biases (η) really differ


def test_twin_saves_and_loads(tmp_path):
    twin = analysis.to_ste(small_net(), keras.optimizers.SGD(0.01)).model
    path = tmp_path / "twin.keras"
    twin.save(path)
    restored = keras.models.load_model(path)
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    np.testing.assert_array_equal(twin.predict(x, verbose=0), restored.predict(x, verbose=0))


def test_errors_name_the_problem():
    model = small_net()
    with pytest.raises(ValueError, match="adaptive"):
        analysis.to_ste(model, keras.optimizers.Muon() if hasattr(keras.optimizers, "Muon")
                        else keras.optimizers.Optimizer(0.1))
    with pytest.raises(TypeError, match="optimizer"):
        analysis.to_ste(model, "sgd")
    # Two layers with different sharpness have different α: each kernel carries its own.
    inputs = keras.Input((4,))
    h = kquant.QuantDense(4, kernel_quantizer=htge_uniform(2.0))(inputs)
    mixed = keras.Model(inputs, kquant.QuantDense(2, kernel_quantizer=htge_uniform(5.0))(h))
    twin = analysis.to_ste(mixed, keras.optimizers.SGD(0.1))
    scales = [l.kernel_quantizer.estimator.scale for l in analysis.quantized_layers(twin.model)]
    assert scales == pytest.approx([closed_alpha(2.0), closed_alpha(5.0)], rel=1e-5)
    assert np.isnan(twin.alpha)
    analysis.to_ste(mixed, keras.optimizers.Adam(0.1))  # fine: Adam needs no α
    float_model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="kernel quantizer"):
        analysis.to_ste(float_model, keras.optimizers.SGD(0.1))


# -- Theorem 5.1 on a one-weight quadratic ----------------------------------------------
class _Trace(keras.callbacks.Callback):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.values = layer, []

    def on_train_begin(self, logs=None):
        if hasattr(self.model, "jax_state_sync"):  # JAX's fit keeps state outside the variables
            self.model.jax_state_sync()
        self.values.append(float(keras.ops.convert_to_numpy(self.layer.latent_kernel)[0, 0]))

    def on_train_batch_end(self, batch, logs=None):
        self.on_train_begin()


def _one_weight(w0, estimator):
    inputs = keras.Input((1,))
    layer = kquant.QuantDense(1, use_bias=False, kernel_quantizer=kquant.quantizers.Uniform(
        bits=2, step=STEP, estimator=estimator))
    model = keras.Model(inputs, layer(inputs))
    layer.latent_kernel.assign([[w0]])
    return model, layer


def _compile(model, optimizer):
    # One tiny weight: tracing dominates, so skip XLA on TF (JAX always jits).
    model.compile(optimizer=optimizer, loss="mse",
                  jit_compile=False if keras.backend.backend() == "tensorflow" else "auto")


def _train(model, layer, lr, steps, target):
    _compile(model, keras.optimizers.SGD(lr))
    trace = _Trace(layer)
    x, y = np.ones((steps, 1), "float32"), np.full((steps, 1), target, "float32")
    model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[trace])
    return np.array(trace.values, dtype="float64")


def _quantize(w):
    return STEP * np.clip(np.floor(w / STEP + 0.5), -2, 1)


def _run_pair(lr, steps, w0=-0.33, target=0.5, unadjusted=True):
    """Q̂ net (lr), its to_ste twin (α·lr, M(w0)) and the plain STE net; f(q) = (q − target)²."""
    q_model, q_layer = _one_weight(w0, {"name": "htge", "config": {"t": T_HTGE}})
    twin = analysis.to_ste(q_model, keras.optimizers.SGD(lr))
    s_layer = analysis.quantized_layers(twin.model)[0]
    w_q = _train(q_model, q_layer, lr, steps, target)
    _compile(twin.model, twin.optimizer)
    trace = _Trace(s_layer)
    x, y = np.ones((steps, 1), "float32"), np.full((steps, 1), target, "float32")
    twin.model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[trace])
    w_s = np.array(trace.values)
    w_u = None
    if unadjusted:  # "unadjusted": STE with the same w0 and lr
        u_model, u_layer = _one_weight(w0, "clipped_ste")
        w_u = _train(u_model, u_layer, lr, steps, target)
    grad = lambda w: 2 * (_quantize(w) - target)  # noqa: E731  ∇f w.r.t. Q(w)
    return w_q, w_s, w_u, grad


def test_theorem_5_1_trajectories_stay_within_eta_squared():
    alpha = closed_alpha(T_HTGE)
    # Bound pieces: |M''| ≤ 2α/Δ·sinh t, |Q̂'| ≤ t/2 (x units), |∇f| ≤ 2·(0.9).
    curvature = 2 * alpha / STEP * math.sinh(T_HTGE)
    results = {}
    for lr, steps in ((0.004, 100), (0.002, 200)):
        w_q, w_s, w_u, grad = _run_pair(lr, steps, unadjusted=lr == 0.004)
        assert w_q[-1] > w_q[0] + 1.5 * STEP  # it crossed boundaries on the way up
        err = np.abs(closed_m(w_q) - w_s)
        assert err[0] < 1e-7
        inc = np.diff(err)
        gradient_error = lr * alpha * np.abs(grad(w_q[:-1]) - grad(w_s[:-1]))
        convexity = 0.5 * curvature * (lr * 1.8 * T_HTGE / 2) ** 2
        assert np.all(inc <= gradient_error + convexity + 1e-6)  # Theorem 5.1, each step
        drift = None if w_u is None else np.abs(w_q - w_u).max()
        results[lr] = (np.max(inc - gradient_error), err.max(), drift)
    (r_big, e_big, u_big), (r_small, e_small, _) = results[0.004], results[0.002]
    # The per-step excess is O(η²): halving η makes it ~4× smaller (measured 14.5× for η/4).
    assert r_big / r_small > 3
    # Over the same path (η·steps fixed) the error is O(η) and small against a bin ...
    assert e_big / e_small > 1.6
    assert e_big < 0.05 * STEP
    # ... while the unadjusted STE net drifts by a sizeable part of a bin (measured 29×).
    assert u_big > 5 * e_big
