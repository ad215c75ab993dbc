"""Forward quantizers: allowed levels, idempotence, exact encode/decode, validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from keras import ops

import kquant
from kquant.testing import take_step
from kquant.quantizers import BWN, DoReFa, Sign, Uniform

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch

# subnormals excluded: TF flushes them to zero on CPU (sign(-1e-40) = +1 there)
FLOATS = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                   width=32)
TENSORS = arrays("float32", array_shapes(min_dims=1, max_dims=3, max_side=4), elements=FLOATS)


def run(q, x):
    x = np.asarray(x, "float32")
    if not q.built:
        q.build(x.shape)
    return ops.convert_to_numpy(q(x, training=False))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(TENSORS)
def test_sign_levels_and_idempotence(x):
    q = Sign()
    y = run(q, x)
    np.testing.assert_array_equal(y, np.where(x >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(run(q, y), y)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(TENSORS, st.booleans())
def test_bwn_levels_and_idempotence(x, per_channel):
    q = BWN(per_channel=per_channel)
    y = run(q, x)
    axes = tuple(range(x.ndim - 1)) if per_channel else None
    scale = np.mean(np.abs(x), axis=axes, keepdims=True)
    np.testing.assert_allclose(y, np.where(x >= 0, 1.0, -1.0) * scale, rtol=1e-6)
    np.testing.assert_allclose(run(BWN(per_channel=per_channel), y), y, rtol=1e-5)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(TENSORS, st.integers(1, 6))
def test_dorefa_levels(x, bits):
    y = run(DoReFa(bits=bits), x)
    levels = 2 * np.arange(2**bits) / (2**bits - 1) - 1
    assert np.all(np.min(np.abs(y[..., None] - levels), axis=-1) < 1e-6)
    t = np.tanh(x.astype("float64"))
    w = t / (2 * max(np.abs(t).max(), 1e-12)) + 0.5
    ref = 2 * np.floor((2**bits - 1) * w + 0.5) / (2**bits - 1) - 1
    close = np.abs(((2**bits - 1) * w) % 1 - 0.5) > 1e-4  # away from float ties
    np.testing.assert_allclose(y[close], ref[close], atol=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(TENSORS, st.integers(2, 8), st.booleans(), st.floats(0.01, 4.0))
def test_uniform_fixed_step_levels_and_idempotence(x, bits, symmetric, step):
    q = Uniform(bits=bits, symmetric=symmetric, step=step)
    y = run(q, x)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    k = y / np.float32(step)
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert k.min() >= lo - 1e-3 and k.max() <= hi + 1e-3
    np.testing.assert_array_equal(run(q, y), y)


def test_uniform_learnable_step_initialises_from_data_and_gets_gradient():
    from kquant.testing import grad

    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    q = Uniform(bits=4)
    q.build(x.shape)
    run(q, x)  # an inference call never initialises (issue #12)
    assert float(ops.convert_to_numpy(q.initialized)) == 0.0
    q(x, training=True)   # a training call alone stores nothing: the optimizer's step does
    assert float(ops.convert_to_numpy(q.initialized)) == 0.0
    take_step(q, lambda: ops.sum(q(x, training=True)))
    init = 2 * np.mean(np.abs(x)) / np.sqrt(7)
    np.testing.assert_allclose(ops.convert_to_numpy(q.step_init), init, rtol=1e-5)
    # a second batch does not re-initialise
    take_step(q, lambda: ops.sum(q(10 * x, training=True)))
    np.testing.assert_allclose(ops.convert_to_numpy(q.step_init), init, rtol=1e-5)
    # LSQ-style gradient reaches the step through Δ·step(x/Δ)
    from kquant.testing import variable_grads

    (g,) = variable_grads([q.step_scale], lambda: ops.sum(q(x, training=True) ** 2))
    assert np.isfinite(g).all() and abs(float(np.sum(g))) > 0
    _ = grad


class _UnfusedUniform(Uniform):
    """Uniform through the generic pre → estimator → post path (autodiff of the maps)."""

    def pre(self, x, training=None):
        return super().pre(x, training=training)


@pytest.mark.parametrize("kwargs", [
    dict(bits=3), dict(bits=4, symmetric=False), dict(bits=3, per_channel=True),
    dict(bits=2, symmetric=False, offset=0.1, lsq_grad_scale=False),
], ids=["symmetric", "asymmetric", "per_channel", "offset"])
@pytest.mark.parametrize("estimator", ["ste", "htge"])
def test_uniform_learnable_step_gradients_equal_autodiff_of_the_maps(kwargs, estimator):
    """The one-pass gradient (``Uniform.fused``) w.r.t. the input and the learnable step Δ
    equals autodiff of ``Δ·F(clip((x − m)/Δ)) + m``: ``∂ℓ/∂x = F'(s)·g``,
    ``∂ℓ/∂Δ = Σ(g·q − F'(s)·g·z)`` times LSQ's scale."""
    from kquant.testing import grad, variable_grads

    rng = np.random.default_rng(len(kwargs))
    x = rng.normal(size=(16, 3)).astype("float32")
    x[0, 0] = 9.0                                   # past the clip bound
    up = ops.convert_to_tensor(rng.normal(size=x.shape).astype("float32"))
    results = {}
    for cls in (Uniform, _UnfusedUniform):
        q = cls(estimator=estimator, **kwargs)
        q.build(x.shape)
        q(x, training=True)                         # data-initialised step
        loss = lambda v, q=q: ops.sum(ops.multiply(q(v, training=True), up))  # noqa: E731
        _, (g_x,) = grad(loss, x)
        g_step = variable_grads(q, lambda q=q, loss=loss: loss(ops.convert_to_tensor(x)))
        results[cls.__name__] = (g_x, g_step)
    (fx, fs), (ux, us) = results["Uniform"], results["_UnfusedUniform"]
    np.testing.assert_allclose(fx, ux, rtol=1e-5, atol=1e-6)
    assert len(fs) == len(us) >= 1 and all(g is not None and np.abs(g).sum() > 0 for g in fs)
    for a, b in zip(fs, us):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q", [Sign(), BWN(), BWN(per_channel=True), DoReFa(bits=3),
                               Uniform(bits=4, step=0.1), Uniform(bits=3, symmetric=False),
                               Uniform(bits=5, per_channel=True)],
                         ids=lambda q: q.name)
def test_encode_decode_is_exact_and_packable(q):
    x = np.random.default_rng(0).normal(size=(3, 3, 2, 5)).astype("float32")
    y = run(q, x)
    codes, params = q.encode(x)
    assert codes.min() >= 0 and codes.max() < 2**q.precision
    np.testing.assert_array_equal(ops.convert_to_numpy(q.decode(codes, params)), y)


@pytest.mark.parametrize("make, arg", [
    (lambda: DoReFa(bits=0), "bits"), (lambda: DoReFa(bits=33), "bits"),
    (lambda: DoReFa(bits=2.5), "bits"), (lambda: Uniform(bits=1), "bits"),
    (lambda: Uniform(bits=4, step=-1.0), "step"),
    (lambda: Uniform(bits=4, step=0.5, per_channel=True), "per_channel"),
    (lambda: Uniform(bits=4, offset=1.0), "offset"),
])
def test_invalid_quantizer_arguments_are_named(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_quantizer_factory_and_serialization_round_trip():
    q = kquant.quantizer("dorefa", bits=3, estimator="htge")
    assert q.precision == 3 and type(q.estimator).__name__ == "HTGE"
    again = kquant.quantizers.get(kquant.quantizers.serialize(q))
    assert again.get_config() == q.get_config()
    with pytest.raises(ValueError, match=r"Installed quantizers: .*dorefa.*uniform"):
        kquant.quantizer("no_such_quantizer")


@pytest.mark.parametrize("name", sorted(kquant.quantizers.available()))
def test_every_registered_quantizer_round_trips_its_config(name):
    q = kquant.quantizers.get(name)
    again = kquant.quantizers.get(kquant.quantizers.serialize(q))
    assert type(again) is type(q) and again.get_config() == q.get_config()
    rebuilt = type(q).from_config(q.get_config())
    assert rebuilt.get_config() == q.get_config()


@pytest.mark.slow
def test_new_quantizers_fit_under_jit_save_load_and_continue(tmp_path):
    """TWN, BitNet, stochastic sign (kernels) and PACT (inputs) in one model."""
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (x[:, :1] + x[:, 1:2] > 0).astype("float32")
    jit = keras.backend.backend() != "torch"  # torch's jit_compile is TorchDynamo: not our target
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)),
        kquant.QuantDense(16, kernel_quantizer="twn", activation="relu"),
        kquant.QuantDense(16, kernel_quantizer="bitnet", input_quantizer=kquant.quantizer(
            "pact", bits=2, alpha=3.0), activation="relu"),
        kquant.QuantDense(16, kernel_quantizer=kquant.quantizer("stochastic_sign", seed=2)),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(keras.optimizers.Adam(0.02), "binary_crossentropy", jit_compile=jit)
    loss = model.fit(x, y, epochs=20, batch_size=32, verbose=0).history["loss"]
    assert loss[-1] < loss[0]
    path = tmp_path / "m.keras"
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(x, training=False)),
                                  keras.ops.convert_to_numpy(model(x, training=False)))
    more = again.fit(x, y, epochs=1, batch_size=32, verbose=0).history["loss"]  # continues
    assert np.isfinite(more[-1])


def test_new_quantizers_train_under_mixed_precision():
    import keras

    x = np.random.default_rng(1).normal(size=(16, 6)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((6,)),
            kquant.QuantDense(8, kernel_quantizer="twn", input_quantizer=kquant.quantizer(
                "pact", bits=3, alpha=2.0)),
            kquant.QuantDense(8, kernel_quantizer="bitnet"),
            kquant.QuantDense(1, kernel_quantizer=kquant.quantizer("stochastic_sign", seed=1)),
        ])
        model.compile(keras.optimizers.Adam(0.01), "mse")
        before = [np.array(keras.ops.convert_to_numpy(w)) for w in model.trainable_weights]
        for _ in range(2):  # the loss-scale optimizer may skip a first overflowing step
            loss = model.train_on_batch(x, y)
        out = model(x, training=False)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.isfinite(loss) and keras.backend.standardize_dtype(out.dtype) == "float16"
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))  # every weight moved, α too
