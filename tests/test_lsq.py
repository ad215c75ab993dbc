"""Issue #9: LSQ's step-size gradient scale g = 1/√(N·Q_P) (Esser et al. 2020, §2.2)."""

import numpy as np
import pytest
from keras import ops

import kquant
from kquant.testing import take_step, variable_grads

pytestmark = pytest.mark.core


def _expected_step_grad(x, u, step, lo, hi, axis=None):
    """LSQ's ∂L/∂Δ for L = Σ u·Q(x): Σ u·(round(z) − z) inside [lo, hi], Σ u·level outside."""
    z = x.astype("float64") / step
    inside = (z >= lo) & (z <= hi)
    q = np.floor(np.clip(z, lo, hi) + 0.5)
    d = np.where(inside, q - z, q)
    return np.sum(u * d, axis=axis)


@pytest.mark.parametrize("per_channel", [False, True])
def test_step_gradient_is_lsq_with_its_scale(per_channel):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    u = rng.normal(size=(64, 4)).astype("float32")
    grads, outs = {}, {}
    for scaled in (True, False):
        q = kquant.quantizer("uniform", bits=4, per_channel=per_channel, estimator="clipped_ste",
                             lsq_grad_scale=scaled)
        q.build(x.shape)
        take_step(q, lambda: ops.sum(q(x, training=True)))  # stores Δ₀ = 2·mean|x|/√Q_P
        ut = ops.convert_to_tensor(u)
        (g,) = variable_grads([q.step_scale], lambda: ops.sum(q(x, training=True) * ut))
        grads[scaled] = g
        outs[scaled] = ops.convert_to_numpy(ops.stop_gradient(q(x, training=True)))
    step0 = ops.convert_to_numpy(q.step_init).astype("float64")
    qp = 7.0                                  # 4-bit symmetric: levels −8..7
    n = 64 if per_channel else 256            # values sharing one step
    axis = 0 if per_channel else None
    dq_dstep = _expected_step_grad(x, u, step0, -8, 7, axis=axis)
    # Δ = Δ₀·|c| at c = 1: ∂L/∂c = Δ₀·∂L/∂Δ
    np.testing.assert_allclose(grads[False], step0 * dq_dstep, rtol=1e-4, atol=1e-5)
    g = 1.0 / np.sqrt(n * qp)
    np.testing.assert_allclose(grads[True], g * step0 * dq_dstep, rtol=1e-4, atol=1e-6)
    assert q.lsq_gradient_scale == 1.0
    # the forward value is untouched by the gradient scale
    np.testing.assert_array_equal(outs[True], outs[False])


def test_activation_n_counts_one_example_features():
    q = kquant.quantizer("uniform", bits=3, symmetric=False)
    q.build((None, 6, 5))
    assert q.lsq_gradient_scale == pytest.approx(1.0 / np.sqrt(30 * 7))
    qc = kquant.quantizer("uniform", bits=3, per_channel=True)
    qc.build((3, 3, 8, 16))
    assert qc.lsq_gradient_scale == pytest.approx(1.0 / np.sqrt(72 * 3))


def test_lsq_grad_scale_is_validated_and_serialised():
    with pytest.raises(ValueError, match="lsq_grad_scale"):
        kquant.quantizer("uniform", bits=4, lsq_grad_scale="yes")
    q = kquant.quantizer("uniform", bits=4, lsq_grad_scale=False)
    again = kquant.quantizers.get(kquant.quantizers.serialize(q))
    assert again.lsq_grad_scale is False
