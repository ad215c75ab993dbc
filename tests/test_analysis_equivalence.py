"""α and M against closed forms ("Custom gradient estimators are STEs in disguise", Eq. 4)."""

import math

import numpy as np
import pytest

import kquant
from kquant import analysis
from kquant.analysis import NotEquivalentError
from kquant.estimators import Estimator
from kquant.staircase import Staircase


def uniform(estimator, bits=2, step=0.25, symmetric=True, offset=0.0):
    return kquant.quantizers.Uniform(bits=bits, step=step, symmetric=symmetric, offset=offset,
                                     estimator=estimator)


def htge(t):
    return {"name": "htge", "config": {"t": t}}


def closed_alpha(t):
    """2 / ∫_{-1}^{1} ds / (t/2·sech²(ts/2)) = 2 / (2/t·(1 + sinh t / t)) = t²/(t + sinh t)."""
    return t * t / (t + math.sinh(t))


def closed_m(x, t, step, lo, hi, offset=0.0):
    """M(x) = m + Δ(b + α/2·G(s)), G(s) = (s + sinh(ts)/t)/t, for x inside the range."""
    a = closed_alpha(t)
    z = (x - offset) / step
    b = np.clip(np.floor(z) + 0.5, lo + 0.5, hi - 0.5)
    s = 2 * (z - b)
    return offset + step * (b + a / 2 * (s + np.sinh(t * s) / t) / t)


@pytest.mark.parametrize("t", [0.5, 2.0, 11 / 3, 6.0])
@pytest.mark.parametrize("step", [0.1, 1.7])
def test_htge_alpha_matches_closed_form_and_ignores_step(t, step):
    eq = analysis.equivalence(quantizer=uniform(htge(t), step=step))
    np.testing.assert_allclose(eq.alpha, closed_alpha(t), rtol=2e-6)
    assert analysis.htge_alpha(t) == pytest.approx(closed_alpha(t), rel=1e-12)


@pytest.mark.parametrize("symmetric, offset", [(True, 0.0), (False, -0.6)])
def test_htge_weight_map_matches_closed_form(symmetric, offset):
    t, step, bits = 3.0, 0.4, 3
    q = uniform(htge(t), bits=bits, step=step, symmetric=symmetric, offset=offset)
    st = q.staircase
    rng = np.random.default_rng(0)
    x = offset + step * rng.uniform(st.lo, st.hi, size=(50, 7))
    mapped = analysis.weight_map(quantizer=q)(x)
    assert mapped.shape == x.shape
    np.testing.assert_allclose(mapped, closed_m(x, t, step, st.lo, st.hi, offset), atol=1e-6 * step)


def test_boundaries_are_fixed_points_and_map_is_monotone():
    q = uniform(htge(4.0), bits=3, step=0.3)
    eq = analysis.equivalence(quantizer=q)
    st = q.staircase
    boundaries = 0.3 * (np.arange(st.lo, st.hi) + 0.5)
    np.testing.assert_array_equal(eq(boundaries), boundaries)
    x = np.linspace(0.3 * (st.lo - 2), 0.3 * (st.hi + 2), 20001)
    m = eq(x)
    assert np.all(np.diff(m) > 0)
    # Bins are preserved: a weight and its image quantize to the same level.
    levels = lambda v: np.clip(np.floor(v / 0.3 + 0.5), st.lo, st.hi)  # noqa: E731
    np.testing.assert_array_equal(levels(m), levels(x))


def test_symmetric_estimator_fixes_levels_and_range():
    eq = analysis.equivalence(quantizer=uniform(htge(5.0), step=0.5))
    levels = 0.5 * np.arange(-2, 2)
    np.testing.assert_allclose(eq(levels), levels, atol=1e-9)
    assert eq.pwl_range == pytest.approx((-1.0, 0.5), abs=1e-9)
    twin = eq.twin_estimator()
    assert kquant.estimators.serialize(twin) == {"name": "clipped_ste", "config": {"clip": 1.0}}


@pytest.mark.parametrize("quantizer", [uniform("ste", bits=4, step=0.2), kquant.quantizer("sign", estimator="ste")])
def test_ste_is_its_own_twin(quantizer):
    eq = analysis.equivalence(quantizer=quantizer)
    assert eq.alpha == pytest.approx(1.0, abs=1e-12)
    x = np.random.default_rng(1).normal(0, 3, 1000)  # inside and far outside the range
    np.testing.assert_allclose(eq(x), x, rtol=0, atol=1e-12)
    assert eq.pwl_range is None
    assert type(eq.twin_estimator()).__name__ == "STE"


def test_binary_alpha_is_one_and_pwl_range_is_mapped():
    t = 2.5
    eq = analysis.equivalence(quantizer=kquant.quantizer("sign", estimator=htge(t)))
    assert eq.alpha == 1.0
    w = np.linspace(-1, 1, 41)
    np.testing.assert_allclose(eq(w), (w + np.sinh(t * w) / t) / t, rtol=1e-6, atol=1e-9)
    edge = (1 + math.sinh(t) / t) / t
    assert eq.pwl_range == pytest.approx((-edge, edge), rel=1e-6)
    assert eq.twin_estimator().clip == pytest.approx(edge, rel=1e-6)
    # Past the range both nets are stuck: M continues as a translation.
    np.testing.assert_allclose(eq(np.array([1.5, -3.0])), [edge + 0.5, -edge - 2.0], rtol=1e-6)


def test_mad_integrates_outside_the_range():
    """MAD: F' = c/(c + (|s|−1)/2) outside (c/|z|, c = 1 above, 2 below levels −2..1), so
    G(s) = 1 + (|s|−1) + (|s|−1)²/(4c) and the twin is the plain STE."""
    step = 0.5
    eq = analysis.equivalence(quantizer=uniform("mad", step=step))  # levels -2..1
    assert eq.alpha == pytest.approx(1.0, abs=1e-9)
    x = np.array([1.0, 2.0, -2.0])
    s = np.array([3.0, 7.0, -5.0])  # 2(z − b) with b = 0.5 (top), -1.5 (bottom)
    b = np.array([0.5, 0.5, -1.5])
    c = np.array([1.0, 1.0, 2.0])
    a = np.abs(s) - 1
    expected = step * (b + 0.5 * np.sign(s) * (1 + a + a**2 / (4 * c)))
    np.testing.assert_allclose(eq(x), expected, rtol=1e-6)
    assert type(eq.twin_estimator()).__name__ == "STE"


def test_stateful_estimator_uses_its_current_state():
    ede = kquant.estimators.get("ede")
    ede.build(None)
    ede.set_progress(0.5)  # t = 0.1, k = 10: F'(s) = sech²(0.1 s)
    eq = analysis.equivalence(ede, staircase=Staircase.sign())
    w = np.array([0.3, -0.8, 2.0])
    t = 0.1
    np.testing.assert_allclose(eq(w), (w / 2 + np.sinh(2 * t * w) / (4 * t)), rtol=1e-5)


def test_approx_sign_diverges():
    with pytest.raises(NotEquivalentError, match="diverges"):
        analysis.equivalence(quantizer=kquant.quantizer("sign", estimator="approx_sign"))
    with pytest.raises(NotEquivalentError, match="diverges"):
        analysis.equivalence(quantizer=uniform("approx_sign"))


def test_negative_and_non_elementwise_estimators_are_refused():
    with pytest.raises(NotEquivalentError, match="negative"):
        analysis.equivalence(quantizer=uniform({"name": "swish_sign", "config": {"beta": 5.0}}))

    class WholeTensor(Estimator):
        def gradient(self, upstream, ctx):
            return upstream

    with pytest.raises(NotEquivalentError, match="elementwise"):
        analysis.equivalence(WholeTensor(), staircase=Staircase(-2, 1))


@pytest.mark.parametrize("quantizer, words", [
    (kquant.quantizers.BWN(estimator="ste"), "BWN"),
    (kquant.quantizers.DoReFa(bits=2, estimator="ste"), "uniform"),
    (kquant.quantizers.Uniform(bits=2, estimator="ste"), "step"),
])
def test_unsupported_quantizers_are_named(quantizer, words):
    with pytest.raises(NotEquivalentError, match=words):
        analysis.equivalence(quantizer=quantizer)


def test_argument_errors():
    with pytest.raises(ValueError, match="staircase"):
        analysis.equivalence("ste")
    with pytest.raises(ValueError, match="step"):
        analysis.equivalence("ste", staircase=Staircase(-2, 1), step=0.0)
    with pytest.raises(ValueError, match="nodes"):
        analysis.equivalence("ste", staircase=Staircase(-2, 1), nodes=10)
