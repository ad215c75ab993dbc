"""EWGS layers, δ from the Hessian trace, training, plugin registration, saving."""

import numpy as np
import pytest
from click.testing import CliRunner
from kquant.testing import take_step, variable_grads
from keras import ops

import keras
import kquant
from kquant_ewgs import (
    EWGS,
    DeltaUpdate,
    EWGSConv2D,
    EWGSDense,
    EWGSQuantizer,
    estimate_deltas,
    hutchinson_trace,
)


def _hutchinson_tolerance(h, samples, k=4.0):
    """k standard errors of the Rademacher estimator: Var[vᵀHv] = 2 Σ_{i≠j} H_ij²."""
    off = h - np.diag(np.diag(h))
    return k * np.sqrt(2.0 * np.sum(off**2) / samples)


def test_hutchinson_matches_exact_trace_of_a_quadratic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    h = (a + a.T) / 2 + np.diag(rng.uniform(1, 4, 12))   # Hessian of ½pᵀHp + bᵀp
    b = rng.normal(size=12)
    h32, b32 = ops.convert_to_tensor(h.astype("float32")), ops.convert_to_tensor(b.astype("float32"))

    def f(ps):
        p = ps[0]
        return 0.5 * ops.sum(p * ops.matmul(h32, p)) + ops.sum(b32 * p)

    samples = 200
    (trace,), (g,) = hutchinson_trace(f, [np.zeros(12, "float32")], samples=samples, seed=1)
    tol = _hutchinson_tolerance(h, samples)          # ≈ 0.8 here, against Tr(H) ≈ 30
    assert abs(trace - np.trace(h)) < tol, (trace, np.trace(h), tol)
    np.testing.assert_allclose(g, b, rtol=1e-5)       # gradient at 0 is b


def test_delta_from_exact_hessian_of_a_quantized_dense_layer():
    """MSE through EWGSDense is quadratic in x_q: Tr(H) = 8α²‖X‖²/B exactly."""
    rng = np.random.default_rng(1)
    batch, fan_in, units = 16, 6, 3
    x = rng.normal(size=(batch, fan_in)).astype("float32")
    y = rng.normal(size=(batch, units)).astype("float32")
    layer = EWGSDense(units, use_bias=False, kernel_quantizer=EWGSQuantizer(2))
    model = keras.Sequential([keras.Input((fan_in,)), layer])
    model.compile("sgd", "mse")
    take_step(model, lambda: ops.sum(model(x, training=True)))  # stores l, u, α from this batch
    alpha = float(ops.convert_to_numpy(layer.output_scale))
    est = layer.kernel_quantizer.estimator
    # exact Hessian w.r.t. vec(x_q): y = α X (2x_q − 1), ℓ = mean((y − t)²)
    h = np.kron(8 * alpha**2 / (batch * units) * (x.T @ x), np.eye(units))
    samples = 64
    found = estimate_deltas(model, x, y, samples=samples, seed=3)[est]
    assert found.size == fan_in * units
    assert abs(found.trace - np.trace(h)) < _hutchinson_tolerance(h, samples), (found.trace, np.trace(h))
    # δ = (Tr(H)/N) / 3σ(g_xq), g_xq = 2α Xᵀ ∂ℓ/∂y
    y_pred = ops.convert_to_numpy(model(x))
    g_xq = 2 * alpha * x.T @ (2 * (y_pred - y) / (batch * units))
    np.testing.assert_allclose(found.grad_std, g_xq.std(), rtol=1e-4)
    np.testing.assert_allclose(found.delta, found.trace / found.size / (3 * g_xq.std()), rtol=1e-4)
    # the estimate changed nothing
    assert float(ops.convert_to_numpy(est.delta)) == 0.0


def _digits(n=256):
    x, y = kquant.datasets.load("digits")[0]
    return x[:n], y[:n]


def _ewgs_model(delta=0.0, adaptive=True, last_kernel_estimator=None):
    def est():
        return EWGS(delta=delta, adaptive=adaptive)

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        EWGSDense(32, kernel_quantizer=EWGSQuantizer(2, estimator=est()),
                  input_quantizer=EWGSQuantizer(2, kind="activation", estimator=est())),
        keras.layers.ReLU(),
        EWGSDense(10, kernel_quantizer=EWGSQuantizer(2, estimator=last_kernel_estimator or est()),
                  input_quantizer=EWGSQuantizer(2, kind="activation", estimator=est())),
    ])


def test_output_scale_initialised_from_data():
    x = np.abs(np.random.default_rng(4).normal(size=(4, 6, 6, 3))).astype("float32")
    layer = EWGSConv2D(5, 3, kernel_quantizer=EWGSQuantizer(2),
                       input_quantizer=EWGSQuantizer(2, kind="activation"))
    layer(x)
    assert float(ops.convert_to_numpy(layer.output_scaler.initialized)) == 0
    take_step(layer, lambda: ops.sum(layer(x, training=True)))   # the optimizer stores α₀, l, u
    o = ops.convert_to_numpy(layer.convolution_op(x, layer.kernel))
    o_q = ops.convert_to_numpy(layer.convolution_op(layer.input_quantizer(x),
                                                   layer.kernel_quantizer(layer.kernel)))
    np.testing.assert_allclose(float(ops.convert_to_numpy(layer.output_scale)),
                               np.abs(o).mean() / np.abs(o_q).mean(), rtol=1e-4)
    # the forward pass is |α|·conv(Q_A(x), Q_W(W)) + b, and quantized_kernel includes |α|
    out = ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(out, np.abs(o).mean() / np.abs(o_q).mean() * o_q, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer.convolution_op(layer.input_quantizer(x), layer.quantized_kernel())),
        out, rtol=1e-4, atol=1e-5)


def test_interval_and_scale_receive_gradients_and_train():
    x, y = _digits()
    model = _ewgs_model(delta=1e-3, adaptive=False)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.Adam(3e-3), loss)
    take_step(model, lambda: loss(y[:32], model(x[:32], training=True)))   # l₀, u₀, α₀ stored
    names = ("lower_offset", "upper_offset", "offset")
    tracked = [v for v in model.trainable_variables if v.path.split("/")[-1] in names]
    assert len(tracked) == 2 * (2 * 2 + 1)   # two layers × ((weight, activation) × (l, u) + α)
    grads = variable_grads(tracked, lambda: loss(y[:64], model(x[:64], training=True)))
    assert all(np.isfinite(g).all() and abs(float(g)) > 0 for g in grads), grads
    before = [float(ops.convert_to_numpy(v)) for v in tracked]
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.7 * first
    after = [float(ops.convert_to_numpy(v)) for v in tracked]
    assert all(a != b for a, b in zip(after, before))


def test_delta_update_callback_refreshes_adaptive_deltas_only():
    x, y = _digits(128)
    fixed = EWGS(delta=2e-3, adaptive=False)
    model = _ewgs_model(last_kernel_estimator=fixed)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = DeltaUpdate(x, y, every=4, batch_size=32, samples=2)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])   # 4 steps: one refresh
    assert len(cb.history) == 1
    adaptive = [q.estimator for layer in (model.layers[2], model.layers[-1])
                for q in (layer.kernel_quantizer, layer.input_quantizer) if q.estimator.adaptive]
    assert len(adaptive) == 3
    deltas = [float(ops.convert_to_numpy(e.delta)) for e in adaptive]
    assert all(np.isfinite(deltas)) and any(d > 0 for d in deltas), deltas
    assert float(ops.convert_to_numpy(fixed.delta)) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="every"):
        DeltaUpdate(x, y, every=0)


def test_save_and_load_round_trip(tmp_path):
    x, y = _digits(64)
    model = _ewgs_model(delta=0.01, adaptive=False)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    model.layers[2].kernel_quantizer.estimator.set_delta(0.123)
    path = tmp_path / "ewgs.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(ops.convert_to_numpy(model.predict(x, verbose=0)),
                                  ops.convert_to_numpy(loaded.predict(x, verbose=0)))
    est = loaded.layers[2].kernel_quantizer.estimator
    assert isinstance(est, EWGS)
    assert float(ops.convert_to_numpy(est.delta)) == pytest.approx(0.123)


def test_saved_layout_is_the_one_files_were_written_in():
    """Keras saves a layer's variables by position (trainable, then non-trainable). l₀, u₀,
    α₀ became trainable step statistics; created after the offsets they keep the positions
    of files saved when they were non-trainable, which so still load into the right
    variables (a swap would load l₀ into Δl without any error)."""
    layer = EWGSDense(3, kernel_quantizer=EWGSQuantizer(2),
                      input_quantizer=EWGSQuantizer(2, kind="activation"))
    layer(np.ones((2, 4), "float32"))
    legacy = {"kernel_quantizer": ["lower_offset", "upper_offset", "lower_init", "upper_init",
                                   "initialized"],
              "input_quantizer": ["lower_offset", "upper_offset", "lower_init", "upper_init",
                                  "initialized"],
              "output_scaler": ["offset", "init", "initialized"]}
    for attr, names in legacy.items():
        store = {}
        getattr(layer, attr).save_own_variables(store)
        assert [store[str(i)].name for i in range(len(store))] == names, attr


def test_registered_like_a_third_party_plugin():
    assert isinstance(kquant.estimators.get("ewgs"), EWGS)
    assert isinstance(kquant.quantizer("ewgs", bits=3, kind="activation"), EWGSQuantizer)
    info = {p.name: p for p in kquant.estimators.registry.info()}
    assert info["ewgs"].package == "kquant-ewgs"
    est = EWGS(delta=0.05, adaptive=False)
    data = kquant.estimators.serialize(est)
    assert data == {"name": "ewgs", "config": {"delta": 0.05, "adaptive": False}}
    again = kquant.estimators.get(data)
    assert isinstance(again, EWGS) and again.get_config() == est.get_config()
    qdata = kquant.quantizers.serialize(EWGSQuantizer(3, kind="activation"))
    assert qdata["name"] == "ewgs"
    assert kquant.quantizers.get(qdata).get_config()["bits"] == 3
    # by name inside an ordinary kquant layer
    layer = kquant.QuantDense(4, kernel_quantizer="dorefa", estimator="ewgs")
    layer(np.ones((2, 3), "float32"))
    assert isinstance(layer.kernel_quantizer.estimator, EWGS)
    from kquant.cli import main

    out = CliRunner().invoke(main, ["estimators"], terminal_width=200)
    assert out.exit_code == 0 and "ewgs" in out.output and "kquant-ewgs" in out.output


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_intervals_stored_unscaled_under_mixed_precision(policy):
    """l₀, u₀ and α₀ are step statistics: under mixed_float16 the LossScaleOptimizer hands
    them over without its loss-scale division; the weight interval is ∓3σ(W) of the W the
    step saw, and training goes on finite."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        x, y = _digits(64)
        model = _ewgs_model(delta=1e-3, adaptive=False)
        model.add(keras.layers.Activation("linear", dtype="float32"))
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        layer = model.layers[2]
        w = ops.convert_to_numpy(layer.kernel).astype("float64")
        model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)
        q = layer.kernel_quantizer
        stored = [float(ops.convert_to_numpy(v)) for v in (q.lower_init, q.upper_init)]
        np.testing.assert_allclose(stored, (-3 * w.std(), 3 * w.std()), rtol=1e-5)
        alpha0 = float(ops.convert_to_numpy(layer.output_scaler.init))
        assert float(ops.convert_to_numpy(layer.output_scaler.initialized)) == 1.0
        assert 0.1 < alpha0 < 10.0, alpha0   # E|o|/E|o_q|: no factor of the loss scale
        h = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
        assert np.isfinite(h.history["loss"]).all() and h.history["loss"][-1] < h.history["loss"][0]
    finally:
        keras.config.set_dtype_policy(old)
