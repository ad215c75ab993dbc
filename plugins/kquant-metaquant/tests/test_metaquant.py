"""MetaQuant plugin: registration, calibration, late weight update, state, saving."""

import keras
import numpy as np
import pytest

import kquant
import kquant_metaquant as kmq
from kquant_metaquant.calibration import meta_view

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
TORCH = keras.backend.backend() == "torch"
# MetaQuant's late update needs a gradient through the optimizer step π; it is
# implemented for TensorFlow and JAX, and refuses torch with a clear error.
needs_train_step = pytest.mark.skipif(TORCH, reason="MetaQuant trains on TensorFlow and JAX only")


def _data(n=80, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _model(estimator, seed=1, hidden_units=8):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = kquant.QuantDense(hidden_units, activation="relu",
                          kernel_quantizer=kquant.quantizer("dorefa", bits=2, estimator=estimator))(inp)
    out = kquant.QuantDense(3, kernel_quantizer=kquant.quantizer("sign", estimator=estimator))(h)
    return keras.Model(inp, out)


class _DoReFaMaxConstant(kquant.quantizers.DoReFa):
    """DoReFa with max|tanh W| held constant in the backward pass (MetaQuant's convention)."""

    def pre(self, x, training=None):
        t = keras.ops.tanh(x)
        m = keras.ops.stop_gradient(keras.ops.maximum(keras.ops.max(keras.ops.abs(t)), 1e-12))
        return (2**self.bits - 1) * (t / (2.0 * m) + 0.5), {}


def _ste_reference(seed=1, hidden_units=8):
    """The STE model the identity meta network must follow exactly."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    h = kquant.QuantDense(hidden_units, activation="relu",
                          kernel_quantizer=_DoReFaMaxConstant(bits=2, estimator="ste"))(inp)
    out = kquant.QuantDense(3, kernel_quantizer=kquant.quantizer("sign", estimator="ste"))(h)
    return keras.Model(inp, out)


def _identity_fcgrad(hidden=4):
    """FCGrad with weights making M(g) = g, frozen."""
    net = kmq.build_meta_network("fcgrad", hidden=hidden)
    first, second = np.zeros((1, hidden), "float32"), np.zeros((hidden, 1), "float32")
    first[0, 0] = second[0, 0] = 1.0
    net.set_weights([first, second])
    net.trainable = False
    return net


# -- registration and serialization ------------------------------------------------
def test_estimators_are_registered_with_their_package():
    infos = {p.name: p for p in kquant.estimators.registry.info()}
    for name in ("metaquant", "fcgrad", "multifc", "lstmfc"):
        assert name in infos
        assert infos[name].package == "kquant-metaquant"
    assert isinstance(kquant.estimators.get("lstmfc"), kmq.LSTMFC)


@pytest.mark.parametrize("name, kwargs", [("lstmfc", {"hidden": 7}),
                                          ("metaquant", {"meta_network": "fcgrad", "num_layers": 3}),
                                          ("multifc", {"activation": "tanh"})])
def test_serialization_by_registered_name_round_trips(name, kwargs):
    est = kquant.estimators.get(name, **kwargs)
    data = kquant.estimators.serialize(est)
    assert data["name"] == name
    again = kquant.estimators.get(data)
    assert type(again) is type(est) and again.get_config() == est.get_config()
    assert again.meta_spec() == est.meta_spec()


@needs_train_step
def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="meta_network"):
        kquant.estimators.get("metaquant", meta_network="gru")
    with pytest.raises(ValueError, match="hidden"):
        kquant.estimators.get("multifc", hidden=0)
    with pytest.raises(ValueError, match="kernel quantizer"):
        kquant.QuantDense(2, kernel_quantizer="sign", input_quantizer="sign",
                          estimator="multifc").build((None, 3))
    with pytest.raises(ValueError, match="DoReFa, BWN and Sign"):
        meta_view(kquant.quantizer("uniform", bits=2))
    with pytest.raises(ValueError, match="share one MetaQuant estimator"):
        kmq.MetaQuant(_model(kquant.estimators.get("multifc")))
    with pytest.raises(ValueError, match="no kernel quantizer with a MetaQuant"):
        kmq.MetaQuant(_model("ste"))
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,))
    h = kquant.QuantDense(4, kernel_quantizer=kquant.quantizer("sign", estimator="multifc"))(inp)
    out = kquant.QuantDense(3, kernel_quantizer=kquant.quantizer("sign", estimator="lstmfc"))(h)
    with pytest.raises(ValueError, match="must agree"):
        kmq.MetaQuant(keras.Model(inp, out))


# -- calibration ---------------------------------------------------------------------
def test_dorefa_calibration_holds_the_max_constant():
    """Paper Eq. 4 and the authors' code: (1 − tanh² W)/max|tanh W| at every coordinate,
    the arg-max included (no term through the max)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 5)).astype("float32")
    g = rng.normal(size=(4, 5)).astype("float32")
    view = meta_view(kquant.quantizer("dorefa", bits=2))
    got = keras.ops.convert_to_numpy(view.calibrate(keras.ops.convert_to_tensor(w),
                                                    keras.ops.convert_to_tensor(g)))
    paper = g * (1 - np.tanh(w) ** 2) / np.abs(np.tanh(w)).max()
    np.testing.assert_allclose(got, paper, rtol=2e-4, atol=1e-6)
    k = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    t = np.tanh(w)   # the old VJP through the max differed exactly here
    through_max = np.sum(g * t) / np.abs(t).max() ** 2 * np.sign(t[k]) * (1 - t[k] ** 2)
    assert abs(through_max) > 1e-3 and got[k] == pytest.approx(paper[k], rel=2e-4)
    # W̃ of Eq. 1 and the output slope ∂Ŵ/∂q
    soft = keras.ops.convert_to_numpy(view.soft(keras.ops.convert_to_tensor(w)))
    np.testing.assert_allclose(soft, t / np.abs(t).max() / 2 + 0.5, rtol=1e-5, atol=1e-6)
    assert view.output_slope(None) == pytest.approx(2 / 3)


def test_binary_estimator_gates_the_phi_path_at_one():
    """The authors' BWN/sign STE: g·1{|W| ≤ 1} (what the forward of the late update
    differentiates through); DoReFa's staircase is never gated."""
    from kquant.testing import grad

    w = np.array([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 2.0], "float32")
    for name in ("bwn", "sign"):
        q = kquant.quantizer(name, estimator="multifc")
        q.build(w.shape)
        _, (g,) = grad(lambda v: keras.ops.sum(q(v, training=True)), w)
        scale = np.abs(w).mean() if name == "bwn" else 1.0
        np.testing.assert_allclose(g, scale * (np.abs(w) <= 1), rtol=1e-6)


# -- the late weight update ------------------------------------------------------------
def _init_identity_fcgrad(hidden=4):
    """FCGrad built with ``init="identity"`` (the authors' symmetric_init), frozen."""
    net = kmq.build_meta_network("fcgrad", hidden=hidden, init="identity")
    net.trainable = False
    return net


@needs_train_step
@pytest.mark.parametrize("optimizer, make_net", [("sgd", _identity_fcgrad), ("adam", _identity_fcgrad),
                                                 ("sgd", _init_identity_fcgrad)])
def test_identity_meta_network_follows_the_ste_trajectory(optimizer, make_net):
    make = {"sgd": lambda: keras.optimizers.SGD(0.2, momentum=0.9),
            "adam": lambda: keras.optimizers.Adam(0.02)}[optimizer]
    x, y = _data()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 80, 16)]
    ste = _ste_reference()
    ste.compile(optimizer=make(), loss=LOSS)
    meta = kmq.MetaQuant(_model("fcgrad"), meta_network=make_net())
    for src, dst in zip(ste.layers[1:], meta.model.layers[1:]):
        dst.latent_kernel.assign(src.latent_kernel.numpy())
        dst.bias.assign(src.bias.numpy())
    meta.compile(optimizer=make(), loss=LOSS)
    ste_losses = [float(ste.train_on_batch(xb, yb)) for xb, yb in batches[:4]]
    meta_losses = [float(meta.train_on_batch(xb, yb)) for xb, yb in batches]
    # step t of MetaQuant runs on the weights of STE's step t (late update)
    np.testing.assert_allclose(meta_losses[:4], ste_losses, rtol=1e-5)
    ste_kernels = [ste.layers[1].latent_kernel, ste.layers[2].latent_kernel]
    meta_kernels = [meta.model.layers[1].latent_kernel, meta.model.layers[2].latent_kernel]
    for a, b in zip(ste_kernels, meta_kernels):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta.model.layers[1].bias.numpy(), ste.layers[1].bias.numpy(),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(meta_kernels[0].numpy(), ste.layers[1].latent_kernel.numpy() * 0)


@pytest.fixture(scope="module")
def trained_lstmfc():
    """One LSTMFC model trained for 10 steps, shared by the tests below."""
    x, y = _data()
    model = kmq.MetaQuant(_model({"name": "lstmfc", "config": {"hidden": 5}}))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    phi0 = [w.numpy().copy() for w in model.meta_network.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return model, phi0, history, x


def _check_meta_trained(model, phi0, history):
    assert phi0, "the meta network has trainable weights"
    assert int(model.meta_step.numpy()) == 10
    assert float(model.meta_gradient_norm.numpy()) > 0
    changed = [not np.allclose(a, b.numpy()) for a, b in zip(phi0, model.meta_network.trainable_weights)]
    assert any(changed)
    assert np.all(np.isfinite(history.history["loss"]))
    est = model.model.layers[1].kernel_quantizer.estimator
    assert np.abs(est.previous_gradient.numpy()).sum() > 0


@needs_train_step
@pytest.mark.parametrize("name", ["fcgrad", "multifc"])
def test_meta_network_receives_gradient_and_changes(name):
    x, y = _data()
    model = kmq.MetaQuant(_model({"name": name, "config": {"hidden": 8}}))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    phi0 = [w.numpy().copy() for w in model.meta_network.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    _check_meta_trained(model, phi0, history)


@needs_train_step
def test_lstmfc_meta_network_receives_gradient_and_changes(trained_lstmfc):
    model, phi0, history, _ = trained_lstmfc
    _check_meta_trained(model, phi0, history)


@needs_train_step
def test_training_lowers_the_loss():
    x, y = _data(n=64, seed=5)
    model = kmq.MetaQuant(_model("multifc", hidden_units=16))
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=LOSS)
    losses = model.fit(x, y, batch_size=64, epochs=25, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[1]


@needs_train_step
def test_lstmfc_keeps_a_per_coordinate_state(trained_lstmfc):
    model = trained_lstmfc[0]
    for layer in model.model.layers[1:]:
        est = layer.kernel_quantizer.estimator
        n = int(np.prod(layer.latent_kernel.shape))
        assert tuple(est.previous_gradient.shape) == tuple(layer.latent_kernel.shape)
        assert [tuple(s.shape) for s in est.meta_state] == [(n, 5), (n, 5)]
        h = est.meta_state[0].numpy()
        assert np.abs(h).sum() > 0                                  # advanced by the updates
        assert len({tuple(np.round(row, 6)) for row in h}) > 1      # one state per coordinate


@needs_train_step
def test_save_and_reload_gives_identical_predictions(trained_lstmfc, tmp_path):
    model, x = trained_lstmfc[0], trained_lstmfc[3]
    path = tmp_path / "metaquant.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kmq.MetaQuant)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    for a, b in zip(model.weights, loaded.weights):                  # φ, states, pending gradients
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # the quantized model alone also round-trips
    inner = tmp_path / "inner.keras"
    model.model.save(inner)
    np.testing.assert_array_equal(model.model.predict(x, verbose=0),
                                  keras.models.load_model(inner).predict(x, verbose=0))


@needs_train_step
def test_non_finite_gradients_do_not_corrupt_the_state():
    x, y = _data()
    model = kmq.MetaQuant(_model("multifc"))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    model.train_on_batch(x[:16], y[:16])
    bad = x[:16].copy()
    bad[0, 0] = np.nan
    model.train_on_batch(bad, y[:16])
    model.train_on_batch(x[16:32], y[16:32])
    for v in model.weights:
        assert np.all(np.isfinite(v.numpy())), v.path


@pytest.mark.skipif(not TORCH, reason="checks the torch backend's error")
def test_torch_backend_is_refused_with_a_clear_error():
    with pytest.raises(NotImplementedError, match="tensorflow and jax"):
        kmq.MetaQuant(_model("fcgrad"))


# -- MultiFC on signed W̃: the paper's collapse and the use_bias fix ---------------------
def _digits_bwn(estimator):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((64,)),
        kquant.QuantDense(64, activation="relu", kernel_quantizer=kquant.quantizer("bwn", estimator=estimator)),
        kquant.QuantDense(10, kernel_quantizer=kquant.quantizer("bwn", estimator=estimator)),
    ])


def test_multifc_use_bias_network_starts_near_the_gradient():
    plain = kmq.build_meta_network("multifc", hidden=8)
    fixed = kmq.build_meta_network("multifc", hidden=8, use_bias=True)
    assert plain.collapses_to_scalar and not fixed.collapses_to_scalar
    assert len(fixed.trainable_weights) == 4 and len(plain.trainable_weights) == 2
    g = np.linspace(-1, 1, 7).astype("float32")
    w = np.linspace(-0.2, 0.3, 7).astype("float32")
    k0, k1 = (keras.ops.convert_to_numpy(v) for v in plain.trainable_weights)
    out = keras.ops.convert_to_numpy(plain.meta_gradient(g, w)[0])
    np.testing.assert_allclose(out, g * w * (k0 @ k1).item(), rtol=1e-5, atol=1e-7)   # c·g·W̃
    fk0, fk1 = (keras.ops.convert_to_numpy(v) for v in fixed.trainable_weights[:2])
    out = keras.ops.convert_to_numpy(fixed.meta_gradient(g, w)[0])
    np.testing.assert_allclose(out, g * (1 + w * (fk0 @ fk1).item()), rtol=1e-5, atol=1e-7)
    est = kquant.estimators.get("multifc", use_bias=True)
    again = kquant.estimators.get(kquant.estimators.serialize(est))
    assert again.use_bias and again.meta_spec()["use_bias"]


# -- FCGrad's random draw: init="identity" and the uphill warning ----------------------
@pytest.mark.parametrize("kind, layers", [("fcgrad", 1), ("fcgrad", 2), ("fcgrad", 3), ("multifc", 2)])
def test_identity_init_starts_the_linear_stack_as_x(kind, layers):
    net = kmq.build_meta_network(kind, hidden=100, num_layers=layers, init="identity")
    assert net.linear_scale() == pytest.approx(1.0, rel=1e-6)
    g = np.linspace(-1, 1, 9).astype("float32")
    w = np.linspace(0.0, 1.0, 9).astype("float32")
    out = keras.ops.convert_to_numpy(net.meta_gradient(g, w)[0])
    np.testing.assert_allclose(out, g if kind == "fcgrad" else g * w, rtol=1e-6, atol=1e-7)
    # the same maths through the activation-free matmul path (what a nonlinear stack runs)
    relu = kmq.build_meta_network(kind, hidden=100, num_layers=layers, init="identity",
                                  activation="relu")
    x = np.linspace(0.0, 1.0, 9).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(relu.meta_gradient(x, x)[0]),
                               x if kind == "fcgrad" else x * x, rtol=1e-6, atol=1e-7)
    again = kquant.estimators.get(kquant.estimators.serialize(
        kquant.estimators.get(kind, init="identity")))
    assert again.init == "identity" and again.meta_spec()["init"] == "identity"
    assert kmq.FCGradNetwork.from_config(net.get_config()).init == "identity"


def test_fcgrad_biases_start_without_an_offset_and_lstmfc_refuses_identity():
    net = kmq.build_meta_network("fcgrad", hidden=8, use_bias=True)
    zero = np.zeros(5, "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(net.meta_gradient(zero, zero)[0]), zero)
    multi = kmq.build_meta_network("multifc", hidden=8, use_bias=True)
    ones = np.ones(5, "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(multi.meta_gradient(ones, zero)[0]), ones)
    with pytest.raises(ValueError, match="`init`"):
        kquant.estimators.get("lstmfc", init="identity")
    with pytest.raises(ValueError, match="`init`"):
        kquant.estimators.get("fcgrad", init="zeros")


@needs_train_step
def test_a_random_draw_that_starts_uphill_warns():
    import warnings

    net = kmq.build_meta_network("fcgrad", hidden=4)
    first, second = (keras.ops.convert_to_numpy(v) for v in net.trainable_weights)
    net.set_weights([np.abs(first), -np.abs(second)])          # c = Π kernels < 0
    assert net.linear_scale() < 0
    with pytest.warns(UserWarning, match="uphill"):
        kmq.MetaQuant(_model("fcgrad"), meta_network=net)
    net.set_weights([np.abs(first), np.abs(second)])           # c > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kmq.MetaQuant(_model("fcgrad"), meta_network=net)
        kmq.MetaQuant(_model({"name": "fcgrad", "config": {"init": "identity"}}))


@needs_train_step
@pytest.mark.slow
def test_multifc_on_bwn_descends_with_biases_and_warns_without():
    import warnings

    (x, y), _ = kquant.datasets.load("digits")
    x = x.reshape(len(x), -1)
    with pytest.warns(UserWarning, match="cannot descend"):
        plain = kmq.MetaQuant(_digits_bwn("multifc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = kmq.MetaQuant(_digits_bwn({"name": "multifc", "config": {"use_bias": True}}))
    drops = []
    for model in (plain, fixed):
        model.compile(keras.optimizers.Adam(1e-3), LOSS)
        before = model.evaluate(x, y, verbose=0)
        after = model.fit(x, y, batch_size=64, epochs=2, verbose=0).history["loss"][-1]
        drops.append(before - after)
    assert drops[1] > 0.1, drops            # the fix descends (≈ STE: 2.33 → 2.16)
    assert drops[1] > 4 * abs(drops[0]), drops   # the paper's stack barely moves


@needs_train_step
@pytest.mark.slow
def test_benchmark_rows_train_the_labelled_meta_network(tmp_path):
    from kquant.benchmarks import metaquant as bench
    from kquant.benchmarks.common import BenchConfig

    cfg = BenchConfig(tiny=True, batch_size=64, seed=0, out_dir=str(tmp_path),
                      options={"variants": "multifc_bias", "quantizers": "bwn", "optimizers": "sgd"})
    rows = {r["variant"]: r for r in bench.run(cfg).rows}
    assert set(rows) == {"ste", "multifc_bias"}
    assert rows["ste"]["meta_network"] == "STE"
    assert bench.VARIANTS["multifc"] == ("multifc", {})   # the paper's bias-free stack
    assert rows["multifc_bias"]["meta_network"] == (
        "MultiFCNetwork(hidden=16, layers=2, use_bias=True, init=random)")
    # every variant of the cell trained at the cell's learning rate, and compiled alike
    assert rows["ste"]["lr"] == rows["multifc_bias"]["lr"] == pytest.approx(
        bench.LEARNING_RATES[("bwn", "sgd")])
    assert rows["ste"]["jit"] is rows["multifc_bias"]["jit"] is True
    # the floor: STE's step plus the meta network's own work, timed alone
    assert rows["ste"]["meta_net_ms"] is None and rows["multifc_bias"]["meta_net_ms"] > 0
    assert rows["multifc_bias"]["floor_vs_ste"] == pytest.approx(
        1 + rows["multifc_bias"]["meta_net_ms"] / rows["ste"]["step_ms"])
    # no [n, h]·[h, 4h] product in an FC meta network: no products floor
    assert rows["ste"]["products_ms"] is rows["multifc_bias"]["products_ms"] is None
    assert rows["multifc_bias"]["products_floor_vs_ste"] is None


# -- where users run it: XLA, restarts, bad batches -------------------------------------
def _lstmfc(hidden=4):
    return kmq.MetaQuant(_model({"name": "lstmfc", "config": {"hidden": hidden}}))


def _values(model):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.weights]


def _fit_steps(model, x, y, steps, start=0):
    return [float(model.train_on_batch(x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]))
            for i in range(start, start + steps)]


@needs_train_step
@pytest.mark.parametrize("block_rows", [None, 5])
def test_jit_compiled_step_follows_the_uncompiled_one(block_rows, monkeypatch):
    """The whole late update (optimizer π, φ's Adam, LSTM states) under XLA; with
    ``block_rows`` the LSTM runs in row blocks there (48 and 24 kernel weights: blocks of 5)."""
    from kquant_metaquant.meta_networks import LSTMFCNetwork

    rows_seen = []
    cell = LSTMFCNetwork._cell

    def recording_cell(self, grad, *args):
        rows_seen.append(int(grad.shape[0]))
        return cell(self, grad, *args)

    monkeypatch.setattr(LSTMFCNetwork, "_cell", recording_cell)
    x, y = _data()
    runs = {}
    for jit in (False, True):
        model = _lstmfc()
        if block_rows:
            model.meta_network.block_rows = block_rows
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=jit)
        rows_seen.clear()
        runs[jit] = (_fit_steps(model, x, y, 5), _values(model))
    # the traced cells of the compiled step: whole kernels, or blocks of ≤ block_rows
    assert set(rows_seen) == ({48, 24} if not block_rows else {5, 3, 4}), rows_seen
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert int(runs[True][1][[v.path for v in model.weights].index(model.meta_step.path)]) == 5


@needs_train_step
def test_save_load_continue_equals_an_uninterrupted_run(tmp_path):
    """φ, its Adam moments, the LSTM states, the pending gradients, the step counter and
    the model optimizer's state all restore: training goes on exactly as without a stop."""
    x, y = _data()
    whole = _lstmfc()
    whole.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    whole_losses = _fit_steps(whole, x, y, 5)

    first = _lstmfc()
    first.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    losses = _fit_steps(first, x, y, 3)
    first.save(tmp_path / "meta.keras")
    resumed = keras.models.load_model(tmp_path / "meta.keras")
    losses += _fit_steps(resumed, x, y, 2, start=3)
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-6)
    assert [v.shape for v in resumed.weights] == [v.shape for v in whole.weights]
    for v, a, b in zip(whole.weights, _values(resumed), _values(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=v.path)
    for a, b in zip(resumed.optimizer.variables, whole.optimizer.variables):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b),
                                   rtol=1e-6, atol=1e-7)


@needs_train_step
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", ["sample_weight", "input"])
def test_a_non_finite_batch_is_a_step_that_never_happened(jit, bad):
    """A NaN sample weight (the loss and every gradient NaN) or a NaN input (the
    first kernel's gradient NaN; a ReLU may hide it from the loss): nothing is written
    (weights, φ, its moments, LSTM states, pending gradients, the optimizer's state),
    and the next batches train exactly as if the bad one had not been seen."""
    x, y = _data()
    clean = _lstmfc()
    clean.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=jit)
    clean_losses = _fit_steps(clean, x, y, 4)

    model = _lstmfc()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS, jit_compile=jit)
    losses = _fit_steps(model, x, y, 2)
    before = _values(model) + [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    xb, weights = x[32:48].copy(), np.ones(16, "float32")
    if bad == "input":
        xb[3, 2] = np.nan
    else:
        weights[3] = np.nan
    loss = float(model.train_on_batch(xb, y[32:48], sample_weight=weights))
    assert bad == "input" or not np.isfinite(loss)
    after = _values(model) + [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    losses += _fit_steps(model, x, y, 2, start=2)
    np.testing.assert_allclose(losses, clean_losses, rtol=1e-6)
    for a, b in zip(_values(model), _values(clean)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.tf_only
def test_auto_compiles_lstmfc_with_xla_on_tensorflow_but_not_under_a_strategy_or_eagerly():
    import tensorflow as tf

    model = _lstmfc()
    model.compile(optimizer="adam", loss=LOSS)
    assert model.jit_compile is True
    for name in ("fcgrad", "multifc"):    # O(n) networks: Keras' own "auto", as STE gets
        fc = kmq.MetaQuant(_model({"name": name, "config": {"hidden": 4}}))
        fc.compile(optimizer="adam", loss=LOSS)
        twin = _model("ste")
        twin.compile(optimizer="adam", loss=LOSS)
        assert fc.jit_compile == twin.jit_compile
        fc.compile(optimizer="adam", loss=LOSS, jit_compile=True)
        assert fc.jit_compile is True
    model.compile(optimizer="adam", loss=LOSS, run_eagerly=True)
    assert model.jit_compile is False
    model.compile(optimizer="adam", loss=LOSS, jit_compile=False)
    assert model.jit_compile is False
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        scoped = _lstmfc()
        scoped.compile(optimizer="adam", loss=LOSS)
    assert scoped.jit_compile is False    # Keras' "auto" on a CPU-only TensorFlow


@needs_train_step
def test_meta_network_cost_runs_the_network_and_checks_its_size():
    from kquant_metaquant.cost import meta_network_seconds

    net = kmq.build_meta_network("lstmfc", hidden=4)
    assert 0 < meta_network_seconds(net, 50, repeats=2) < 60
    with pytest.raises(ValueError, match="`n` must be a positive integer"):
        meta_network_seconds(net, 0)


@needs_train_step
def test_products_floor_times_lstmfc_products_and_nothing_for_fc_networks():
    from kquant.benchmarks.metaquant import meta_network_ms
    from kquant_metaquant.cost import products_seconds

    assert 0 < products_seconds(kmq.build_meta_network("lstmfc", hidden=4), 50, repeats=2) < 60
    for kind in ("fcgrad", "multifc"):
        assert products_seconds(kmq.build_meta_network(kind, hidden=4), 50) is None
    with pytest.raises(ValueError, match="`n` must be a positive integer"):
        products_seconds(kmq.build_meta_network("lstmfc", hidden=4), 0)
    own, products = meta_network_ms(_lstmfc())   # the benchmark's columns for an LSTMFC row
    assert own > 0 and products > 0
