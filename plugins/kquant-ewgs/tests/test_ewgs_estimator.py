"""EWGS estimator and quantizer: exact gradients against the paper's formulas."""

import numpy as np
import pytest
from kquant.testing import grad
from keras import ops

import kquant
from kquant_ewgs import EWGS, EWGSQuantizer

pytestmark = pytest.mark.core  # backend-agnostic core: also run on torch


def _quantizer(bits, kind, estimator, x):
    q = EWGSQuantizer(bits, kind=kind, estimator=estimator)
    q(ops.convert_to_tensor(x), training=True)  # first training call: data-driven l, u
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


@pytest.mark.parametrize("quantizer", [
    lambda est: EWGSQuantizer(2, estimator=est),
    lambda est: EWGSQuantizer(3, kind="activation", estimator=est),
    lambda est: kquant.quantizer("dorefa", bits=2, estimator=est),
    lambda est: kquant.quantizer("uniform", bits=3, step=0.3, estimator=est),
    lambda est: kquant.quantizer("sign", estimator=est),
])
def test_delta_zero_is_exactly_ste(quantizer):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32") * 1.5
    c = rng.normal(size=x.shape).astype("float32")
    q_ewgs, q_ste = quantizer(EWGS(delta=0.0)), quantizer("ste")
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
