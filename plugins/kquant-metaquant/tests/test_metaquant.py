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
def test_dorefa_calibration_is_the_vjp_of_tanh_over_max():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 5)).astype("float32").astype("float64")
    g = rng.normal(size=(4, 5)).astype("float32").astype("float64")
    view = meta_view(kquant.quantizer("dorefa", bits=2))
    got = keras.ops.convert_to_numpy(view.calibrate(keras.ops.convert_to_tensor(w, "float32"),
                                                    keras.ops.convert_to_tensor(g, "float32")))

    def a(v):
        t = np.tanh(v)
        return t / np.abs(t).max()

    eps, fd = 1e-6, np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        d = np.zeros_like(w)
        d[idx] = eps
        fd[idx] = (np.sum(g * a(w + d)) - np.sum(g * a(w - d))) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=5e-6)   # float32 kernel
    # away from the arg-max it is the paper's (1 − tanh² W)/max|tanh W|
    paper = g * (1 - np.tanh(w) ** 2) / np.abs(np.tanh(w)).max()
    k = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    mask = np.ones_like(w, bool)
    mask[k] = False
    np.testing.assert_allclose(got[mask], paper[mask], rtol=1e-5, atol=1e-7)
    # W̃ of Eq. 1 and the output slope ∂Ŵ/∂q
    soft = keras.ops.convert_to_numpy(view.soft(keras.ops.convert_to_tensor(w)))
    np.testing.assert_allclose(soft, a(w) / 2 + 0.5, rtol=1e-5, atol=1e-6)
    assert view.output_slope(None) == pytest.approx(2 / 3)


# -- the late weight update ------------------------------------------------------------
@needs_train_step
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_identity_meta_network_follows_the_ste_trajectory(optimizer):
    make = {"sgd": lambda: keras.optimizers.SGD(0.2, momentum=0.9),
            "adam": lambda: keras.optimizers.Adam(0.02)}[optimizer]
    x, y = _data()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 80, 16)]
    ste = _model("ste")
    ste.compile(optimizer=make(), loss=LOSS)
    meta = kmq.MetaQuant(_model("fcgrad"), meta_network=_identity_fcgrad())
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
