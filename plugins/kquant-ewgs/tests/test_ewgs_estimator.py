"""EWGS estimator and quantizer: exact gradients against the paper's formulas."""

import keras
import numpy as np
import pytest
from kquant.testing import grad, take_step
from keras import ops

import kquant
from kquant.estimators.ste import STE
from kquant_ewgs import EWGS, EWGSQuantizer

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch


def _quantizer(bits, kind, estimator, x):
    q = EWGSQuantizer(bits, kind=kind, estimator=estimator)
    x = ops.convert_to_tensor(x)
    q(x)                                             # built; l, u not stored yet
    assert float(ops.convert_to_numpy(q.initialized)) == 0
    take_step(q, lambda: ops.sum(q(x, training=True)))   # first applied step: data-driven l, u
    return q


def _paper_gradient(x, c, lower, upper, bits, kind, delta):
    """∂/∂x of Σ c·Q(x) with the paper's Eqs. 1–4 written in x_n, x_q (NumPy)."""
    levels = 2**bits - 1
    x_n_raw = (x - lower) / (upper - lower)
    x_n = np.clip(x_n_raw, 0.0, 1.0)
    x_q = np.floor(levels * x_n + 0.5) / levels
    g_xq = 2.0 * c if kind == "weight" else c                    # Q_W = 2(x_q − ½), Q_A = x_q
    g_xn = g_xq * (1.0 + delta * np.sign(g_xq) * (x_n - x_q))     # Eq. 4
    inside = (x_n_raw > 0) & (x_n_raw < 1)
    return g_xn * inside / (upper - lower)


@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_gradient_equals_paper_formula_elementwise(kind, bits):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(64, 5)).astype("float32")
    if kind == "activation":
        x = np.abs(x)
    c = rng.normal(size=x.shape).astype("float32")
    delta = 0.7
    q = _quantizer(bits, kind, EWGS(delta=delta, adaptive=False), x)
    lower, upper = q.bounds()
    _, (g,) = grad(lambda t: ops.sum(ops.multiply(q(t), c)), x)
    expected = _paper_gradient(x.astype("float64"), c, lower, upper, bits, kind, delta)
    np.testing.assert_allclose(g, expected, rtol=2e-5, atol=1e-6)
    # δ really acts: the gradient differs from STE's where x_n ≠ x_q
    ste = _paper_gradient(x.astype("float64"), c, lower, upper, bits, kind, 0.0)
    assert np.max(np.abs(expected - ste)) > 1e-3


class _GenericSTE(STE):
    """STE without the quantizers' fused path."""

    def fused_slope(self):
        return None


@pytest.mark.parametrize("quantizer", [
    lambda est: EWGSQuantizer(2, estimator=est),
    lambda est: EWGSQuantizer(3, kind="activation", estimator=est),
    lambda est: kquant.quantizer("dorefa", bits=2, estimator=est),
    lambda est: kquant.quantizer("uniform", bits=3, step=0.3, estimator=est),
    lambda est: kquant.quantizer("sign", estimator=est),
])
def test_delta_zero_is_exactly_ste(quantizer):
    """Same backward rule as STE on the generic path (a quantizer's fused one-pass STE
    backward, e.g. DoReFa's, may round differently in the last bit)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32") * 1.5
    c = rng.normal(size=x.shape).astype("float32")
    q_ewgs, q_ste = quantizer(EWGS(delta=0.0)), quantizer(_GenericSTE())
    _, (g_ewgs,) = grad(lambda t: ops.sum(ops.multiply(q_ewgs(t), c)), x)
    _, (g_ste,) = grad(lambda t: ops.sum(ops.multiply(q_ste(t), c)), x)
    np.testing.assert_array_equal(g_ewgs, g_ste)


def test_staircase_form_on_sign_and_uniform():
    """g_z = g_q(1 + δ sign(g_q)(clip(z) − q)/(hi − lo)) on any staircase."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50,)).astype("float32") * 2
    c = rng.normal(size=x.shape).astype("float32")
    delta = 0.9
    for q, lo, hi, scale in [
        (kquant.quantizer("sign", estimator=EWGS(delta=delta)), -1.0, 1.0, 1.0),
        (kquant.quantizer("uniform", bits=3, step=0.5, estimator=EWGS(delta=delta)), -4.0, 3.0, 0.5),
    ]:
        _, (g,) = grad(lambda t: ops.sum(ops.multiply(q(t), c)), x)
        z = x / scale
        zq = np.where(z >= 0, 1.0, -1.0) if hi == 1.0 else np.floor(np.clip(z, lo, hi) + 0.5)
        g_q = c * scale
        g_z = g_q * (1 + delta * np.sign(g_q) * (np.clip(z, lo, hi) - zq) / (hi - lo))
        np.testing.assert_allclose(g, g_z / scale, rtol=1e-5, atol=1e-6)


class _Probe(keras.layers.Layer):
    """``Σ c·Q(W)`` per example: with loss = its mean, one SGD(1) step is
    ``W −= ∂/∂W Σ c·Q(W)``."""

    def __init__(self, quantizer, w0, c, **kwargs):
        super().__init__(**kwargs)
        self.quantizer, self.w0, self.c = quantizer, w0, c

    def build(self, input_shape):
        self.w = self.add_weight(shape=self.w0.shape,
                                 initializer=keras.initializers.Constant(self.w0))

    def call(self, x):
        c = ops.convert_to_tensor(self.c)
        return ops.zeros_like(x) + ops.sum(self.quantizer(self.w) * c)


def test_compiled_train_step_applies_the_current_delta():
    """In ``fit``'s compiled train step on every backend, EWGS's weight gradient is STE's
    plus exactly ``g·δ·sign(g)·(clip(w) − q)/2`` (sign: levels ±1, hi − lo = 2), and a δ
    assigned between steps (as DeltaUpdate does) is the one the next step uses, not a
    value captured when the step was traced."""
    rng = np.random.default_rng(5)
    w0 = (rng.normal(size=(64,)) * 1.5).astype("float32")
    c = rng.normal(size=(64,)).astype("float32")
    batch = np.zeros((2, 1), "float32")

    def train(estimator, deltas):
        model = keras.Sequential([keras.Input((1,)),
                                  _Probe(kquant.quantizer("sign", estimator=estimator), w0, c)])
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss=lambda y, p: ops.mean(p))
        ws = [w0]
        for delta in deltas:
            if delta is not None:
                model.layers[0].quantizer.estimator.delta.assign(delta)
            model.train_on_batch(batch, batch)
            ws.append(ops.convert_to_numpy(model.layers[0].w))
        return ws

    def ewgs_step(w, delta):
        q = np.where(w >= 0, 1.0, -1.0)
        return w - c * (1.0 + delta * np.sign(c) * (np.clip(w, -1.0, 1.0) - q) / 2.0)

    deltas = [0.5, 0.9, 0.0]                      # δ refreshed after each step
    ewgs = train(EWGS(delta=0.5), [None, 0.9, 0.0])
    ste = train("ste", [None, None, None])
    for k, delta in enumerate(deltas):
        np.testing.assert_allclose(ewgs[k + 1], ewgs_step(ewgs[k].astype("float64"), delta),
                                   rtol=1e-6, atol=1e-6, err_msg=f"step {k + 1}")
    # first step, same start: EWGS − STE is exactly the δ term, and it is not small
    e = np.clip(w0, -1.0, 1.0) - np.where(w0 >= 0, 1.0, -1.0)
    term = c * 0.5 * np.sign(c) * e / 2.0
    np.testing.assert_allclose(ste[1] - ewgs[1], term, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(term)) > 0.1


def test_data_driven_interval_initialisation():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 4, 8)).astype("float32") * 0.2
    a = np.maximum(rng.normal(size=(16, 10)), 0).astype("float32")
    qw = _quantizer(2, "weight", "ewgs", w)
    qa = _quantizer(2, "activation", "ewgs", a)
    np.testing.assert_allclose(qw.bounds(), (-3 * w.std(), 3 * w.std()), rtol=1e-5)
    np.testing.assert_allclose(qa.bounds(), (0.0, 3 * a.std() / np.sqrt(1 - 2 / np.pi)), rtol=1e-5)
    qw(w * 10)  # later calls keep the interval
    np.testing.assert_allclose(qw.bounds(), (-3 * w.std(), 3 * w.std()), rtol=1e-5)


def test_forward_values_and_encode_decode():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(30, 4)).astype("float32")
    q = _quantizer(2, "weight", "ewgs", w)
    out = ops.convert_to_numpy(q(w))
    np.testing.assert_allclose(np.unique(out), [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
    codes, params = q.encode(w)
    np.testing.assert_array_equal(ops.convert_to_numpy(q.decode(codes, params)), out)
    qa = _quantizer(2, "activation", "ewgs", np.abs(w))
    np.testing.assert_allclose(np.unique(ops.convert_to_numpy(qa(np.abs(w)))), [0, 1 / 3, 2 / 3, 1],
                               atol=1e-6)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="delta"):
        EWGS(delta=-0.1)
    with pytest.raises(ValueError, match="delta"):
        EWGS(delta="big")
    with pytest.raises(ValueError, match="kind"):
        EWGSQuantizer(2, kind="weights")
    with pytest.raises(ValueError, match="bits"):
        EWGSQuantizer(0)


def test_non_finite_delta_never_stored():
    est = EWGS(delta=0.25)
    est.build()
    est.set_delta(float("nan"))
    est.set_delta(float("inf"))
    assert float(ops.convert_to_numpy(est.delta)) == pytest.approx(0.25)
    est.set_delta(-3.0)
    assert float(ops.convert_to_numpy(est.delta)) == 0.0
