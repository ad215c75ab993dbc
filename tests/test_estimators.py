"""Every built-in estimator: its gradient through a real layer equals its formula."""

import keras
import numpy as np
import pytest
from keras import ops

import kquant
from kquant import estimators
from kquant.testing import grad

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch

# Independent NumPy statements of each estimator's surrogate slope F'(s)
# (papers.md §2; Larq's ste_sign/approx_sign/swish_sign; IR-Net's EDE).
T_HTGE, ALPHA_DSQ, BETA = 3.0, 0.3, 5.0


def _dsq(s, a=ALPHA_DSQ):
    k = np.log(2 / a - 1)
    return k / 2 * (1 - np.tanh(k * s / 2) ** 2) / (1 - a) * (np.abs(s) <= 1)


FORMULAS = {
    "ste": (dict(), lambda s: np.ones_like(s)),
    "clipped_ste": (dict(), lambda s: (np.abs(s) <= 1).astype(float)),
    # Sakr et al. 2022: c/|x| outside, c the clip bound (sign: c = 1, s = x); multi-bit below.
    "mad": (dict(), lambda s: np.where(np.abs(s) <= 1, 1.0, 1.0 / np.maximum(np.abs(s), 1))),
    "htge": (dict(t=T_HTGE),
             lambda s: T_HTGE / 2 * (1 - np.tanh(T_HTGE * s / 2) ** 2) * (np.abs(s) <= 1)),
    "dsq": (dict(alpha=ALPHA_DSQ), _dsq),
    "ede": (dict(), None),  # depends on progress; tested below
    "approx_sign": (dict(), lambda s: np.maximum(2 - 2 * np.abs(s), 0)),
    "swish_sign": (dict(beta=BETA), lambda s: BETA * (2 - BETA * s * np.tanh(BETA * s / 2))
                   / (1 + np.cosh(BETA * s))),
}


def ede_formula(progress):
    t = 1e-3 * (10.0 / 1e-3) ** progress
    k = max(1 / t, 1.0)
    return lambda s: k * t * (1 - np.tanh(t * s) ** 2)


def builtin_names():
    return [n for n in estimators.available() if n in FORMULAS]


def test_every_builtin_has_a_formula():
    info = {p.name: p.package for p in estimators.registry.info()}
    builtins = {n for n, pkg in info.items() if pkg == "kquant"}
    assert builtins == set(FORMULAS)


def _boundary_distance(z, lo, hi):
    b = np.clip(np.floor(z) + 0.5, lo + 0.5, hi - 0.5)
    return 2 * (z - b)


def _edge_weights(delta, lo, hi, n=40, seed=0):
    rng = np.random.default_rng(seed)
    z = np.concatenate([
        rng.uniform(lo - 1.5, hi + 1.5, n),
        np.arange(lo, hi + 1),                 # levels (|s| = 1 at lo and hi)
        np.arange(lo, hi) + 0.5,               # decision boundaries (s = 0)
        [lo - 0.25, hi + 0.25],                # just outside the range
    ])
    return (z * delta).astype("float32")


@pytest.mark.parametrize("name", builtin_names())
def test_layer_gradient_equals_formula_multibit(name):
    kwargs, formula = FORMULAS[name]
    est = estimators.get(name, **kwargs)
    if name == "ede":
        est.build()
        est.set_progress(0.6)
        formula = ede_formula(0.6)
    delta, bits = 0.25, 3
    lo, hi = -4, 3
    w = _edge_weights(delta, lo, hi)
    layer = kquant.QuantDense(
        3, use_bias=False,
        kernel_quantizer=kquant.quantizers.Uniform(bits=bits, step=delta, estimator=est))
    layer.build((None, w.size))
    kernel = w[:, None] * np.array([1.0, 0.5, -1.0], "float32")
    layer.kernel.assign(kernel)
    x = np.random.default_rng(1).normal(size=(5, w.size)).astype("float32")
    up = np.random.default_rng(2).normal(size=(5, 3)).astype("float32")

    def loss(k):
        q = layer.kernel_quantizer(k, training=False)
        return ops.sum(ops.multiply(ops.matmul(ops.convert_to_tensor(x), q), up))

    _, (g,) = grad(loss, kernel)
    s = _boundary_distance(kernel / delta, lo, hi)
    if name == "mad":  # c/|z| past the clip bound c on that side (hi = 3, |lo| = 4)
        z = kernel / delta
        formula = lambda s: np.where(z > hi, hi / np.abs(z), np.where(z < lo, -lo / np.abs(z), 1.0))  # noqa: E731
    expected = (x.T @ up) * formula(s)
    np.testing.assert_allclose(g, expected, rtol=2e-5, atol=2e-5)


def test_mad_tail_is_clip_bound_over_magnitude():
    """Sakr et al.'s MAD on levels −2..1 (Δ = 1): c/|x| with c = 1 above, 2 below —
    not the half-step 1/|s| (which gives ⅓ at both z = 2 and z = −3)."""
    q = kquant.quantizers.Uniform(bits=2, step=1.0, estimator="mad")
    x = np.array([2.0, -3.0, 4.0, -2.5, 0.7, -1.9], "float32")
    q.build(x.shape)
    _, (g,) = grad(lambda v: ops.sum(q(v, training=True)), x)
    np.testing.assert_allclose(g, [0.5, 2 / 3, 0.25, 0.8, 1.0, 1.0], rtol=1e-6)


class _UnfusedDoReFa(kquant.quantizers.DoReFa):
    """DoReFa through the generic pre → estimator → post path (autodiff of the maps)."""

    def pre(self, x, training=None):
        return super().pre(x, training=training)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("bits", [1, 3])
@pytest.mark.parametrize("name", ["ste", "htge"])
def test_dorefa_gradient_equals_formula_with_the_max_and_its_ties(name, bits, ties):
    """DoReFa's one-pass gradient (``DoReFa.fused``) equals the formula and autodiff of
    its maps: with ``t = tanh W``, ``M = max|t|``, ``z = k(t/2M + ½)``,
    ``g_w = 2·F'(s)·g``: ``∂ℓ/∂W = (1 − t²)(g_w/2M + sign(t)·1{|t| = M}/#{|t| = M}·∂ℓ/∂M)``,
    ``∂ℓ/∂M = −2Σ g_w·t/(2M)²`` — the max's gradient split over its ties (±W both)."""
    kwargs, formula = FORMULAS[name]
    rng = np.random.default_rng(bits)
    w = rng.uniform(-0.7, 0.7, 37).astype("float32")
    w[5] = 0.9
    if ties:
        w[11], w[23] = -0.9, 0.9          # |t| = M three times, both signs
    up = rng.normal(size=w.shape).astype("float32")
    grads = {}
    for cls in (kquant.quantizers.DoReFa, _UnfusedDoReFa):
        q = cls(bits=bits, estimator=estimators.get(name, **kwargs))
        q.build(w.shape)
        _, (grads[cls.__name__],) = grad(
            lambda v: ops.sum(ops.multiply(q(v, training=True), ops.convert_to_tensor(up))), w)

    k = 2.0**bits - 1
    t = np.tanh(w.astype("float64"))
    m = np.abs(t).max()
    z = k * (t / (2 * m) + 0.5)
    g_w = 2 * formula(_boundary_distance(z, 0, k)) * up
    tie = np.abs(t) == m
    g_m = -2 * np.sum(g_w * t) / (2 * m) ** 2
    expected = (1 - t * t) * (g_w / (2 * m) + np.sign(t) * tie / tie.sum() * g_m)
    assert tie.sum() == (3 if ties else 1)
    np.testing.assert_allclose(grads["DoReFa"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["DoReFa"], grads["_UnfusedDoReFa"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", builtin_names())
def test_sign_input_gradient_equals_formula(name):
    kwargs, formula = FORMULAS[name]
    est = estimators.get(name, **kwargs)
    if name == "ede":
        est.build()
        est.set_progress(0.3)
        formula = ede_formula(0.3)
    x = np.concatenate([np.random.default_rng(0).uniform(-2, 2, 30),
                        [-1.0, 1.0, 0.0, -0.5, 0.5, 1.5, -1.5]]).astype("float32")[None, :]
    layer = kquant.QuantDense(4, kernel_quantizer=None, input_quantizer=kquant.quantizers.Sign(
        estimator=est), use_bias=False)
    layer.build(x.shape)
    up = np.random.default_rng(3).normal(size=(1, 4)).astype("float32")
    kernel = ops.convert_to_numpy(layer.kernel)

    def loss(inp):
        return ops.sum(ops.multiply(layer(inp, training=False), up))

    _, (g,) = grad(loss, x)
    np.testing.assert_allclose(g, (up @ kernel.T) * formula(x), rtol=2e-5, atol=2e-5)
    # forward is the hard sign, sign(0) = +1
    out_q = layer.input_quantizer(ops.convert_to_tensor(x), training=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(out_q), np.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("name", builtin_names())
def test_derivative_is_slope_of_surrogate(name):
    kwargs, _ = FORMULAS[name]
    est = estimators.get(name, **kwargs)
    est.build()
    if name == "ede":
        est.set_progress(0.5)
    s = np.random.default_rng(0).uniform(-1.8, 1.8, 400)
    s = s[np.min(np.abs(np.abs(s)[:, None] - np.array([0.0, 1.0])), axis=1) > 1e-2]
    h = 1e-3  # float32 on JAX: central differences with O(h²) error
    f = lambda v: ops.convert_to_numpy(est.surrogate(ops.convert_to_tensor(v)))  # noqa: E731
    fd = (f(s + h) - f(s - h)) / (2 * h)
    d = ops.convert_to_numpy(est.derivative(ops.convert_to_tensor(s)))
    np.testing.assert_allclose(d, fd, rtol=2e-3, atol=2e-3)


def test_dsq_soft_forward_and_alpha_gradient():
    est = estimators.get("dsq", alpha=0.3)
    q = kquant.quantizers.Uniform(bits=2, step=1.0, estimator=est)
    x = np.array([-1.7, -1.2, -0.5, 0.1, 0.45, 0.8, 2.5], "float32")
    q.build(x.shape)
    y_soft = ops.convert_to_numpy(q(x, training=True))
    y_hard = ops.convert_to_numpy(q(x, training=False))
    a = 0.3
    k = np.log(2 / a - 1)
    s = _boundary_distance(x, -2, 1)
    b = np.clip(np.floor(x) + 0.5, -1.5, 0.5)
    expected = np.where(np.abs(s) <= 1, b + np.tanh(k * s / 2) / (1 - a) / 2,
                        np.clip(np.floor(x + 0.5), -2, 1))
    np.testing.assert_allclose(y_soft, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y_hard, np.clip(np.floor(x + 0.5), -2, 1))
    assert any(v is est.alpha for v in q.trainable_variables)
    _, (gx,) = grad(lambda v: ops.sum(q(v, training=True)), x)
    np.testing.assert_allclose(gx, _dsq(s, a), rtol=1e-4, atol=1e-5)


def test_ede_schedule_callback_moves_t_and_k():
    model = keras.Sequential([keras.Input((4,)), kquant.QuantDense(
        2, kernel_quantizer="sign", estimator="ede")])
    model.compile("sgd", "mse")
    est = model.layers[0].kernel_quantizer.estimator
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((float(ops.convert_to_numpy(est.t)), float(ops.convert_to_numpy(est.k))))

    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=4, batch_size=8, verbose=0,
              callbacks=[kquant.callbacks.EDESchedule(), Probe()])
    ts = [t for t, _ in seen]
    assert ts == sorted(ts) and ts[0] < ts[-1]
    for p, (t, k) in zip([0, 0.25, 0.5, 0.75], seen):
        np.testing.assert_allclose(t, 1e-3 * 1e4**p, rtol=1e-5)
        np.testing.assert_allclose(k, max(1 / t, 1.0), rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(name="htge", t=0), dict(name="clipped_ste", clip=-1),
                                 dict(name="dsq", alpha=1.5), dict(name="swish_sign", beta=0),
                                 dict(name="ede", t_min=1, t_max=0.5)])
def test_invalid_estimator_arguments_are_named(bad):
    name = bad.pop("name")
    arg = next(iter(bad))
    with pytest.raises(ValueError, match=arg):
        estimators.get(name, **bad)
