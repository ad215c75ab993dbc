"""DoReFa k-bit weights (Zhou et al. 2016).

``W̃ = tanh(W) / (2·max|tanh W|) + ½``, ``Ŵ = 2·round((2^k−1)·W̃)/(2^k−1) − 1``.
The staircase coordinate is ``z = (2^k−1)·W̃`` with levels ``0..2^k−1``;
gradients flow through ``tanh`` and the max as in DoReFa's code.
(DoReFa activations are :class:`~kquant.quantizers.Uniform` with
``symmetric=False, step=1/(2^k−1)``.)
"""

from keras import ops

from kquant.quantizers.base import Quantizer, apply_slope, check_bits
from kquant.quantizers.fused import one_input
from kquant.reductions import count_of_max, max_abs, total_sum, total_sums
from kquant.staircase import Staircase
from kquant.xla import ynn_reduces


class DoReFa(Quantizer):
    """DoReFa k-bit weights: 2·round((2^k−1)·W̃)/(2^k−1) − 1, W̃ = tanh(W)/(2 max|tanh W|) + ½."""

    def __init__(self, bits=2, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.bits = check_bits(bits, "bits", 1, 16)

    @property
    def precision(self):
        return self.bits

    @property
    def staircase(self):
        return Staircase(0.0, float(2**self.bits - 1))

    def pre(self, x, training=None):
        t = ops.tanh(x)
        w = t / (2.0 * ops.maximum(ops.max(ops.abs(t)), 1e-12)) + 0.5
        return (2**self.bits - 1) * w, {}

    def post(self, q, params):
        k = float(2**self.bits - 1)
        return (2.0 * q - k) / k   # one rounding: XLA keeps it (2q/k − 1 it re-associates)

    def fused(self, x, slope, training=None):
        """Value and gradient in one custom-gradient function. With ``t = tanh W``,
        ``M = max|t|``, ``m = max(M, 10⁻¹²)``,
        ``g_w = (2^k−1)·F'(s)·(2/(2^k−1))·g``::

            ∂ℓ/∂W = (1 − t²)·(g_w/(2m) + sign(t)·1{|t| = M}/#{|t| = M}·∂ℓ/∂M),
            ∂ℓ/∂M = −2·Σ(g_w·t)/(2m)²·1{M ≥ 10⁻¹²}

        (the max's gradient split over its ties, as autodiff does).

        Not done: levels found by comparing ``W`` with ``atanh`` of the thresholds (no
        ``tanh`` in the forward). A compiled step evaluates ``tanh W`` once for both
        halves anyway (Dense 2048, TensorFlow XLA: 1.39× → 1.43× float; without XLA
        1.45× → 1.34×, one process each), and those levels can differ from ``pre``'s
        where ``W`` lies within rounding of a threshold: the trained kernel would then
        disagree with the exported codes."""
        if not self._fusable(DoReFa):
            return None
        k = float(2**self.bits - 1)
        st = self.staircase

        def forward(x):
            t = ops.tanh(x)
            big = max_abs(t)
            z = k * (t / (2.0 * ops.maximum(big, 1e-12)) + 0.5)
            return (2.0 * st.hard(z) - k) / k, big

        def backward(g, x, big):  # t recomputed: one fused pass instead of two saved tensors
            t = ops.tanh(x)
            two_m = 2.0 * ops.maximum(big, 1e-12)
            g_s = apply_slope(g, slope, lambda: st.distance(k * (t / two_m + 0.5)))  # g_w = 2·g_s
            # the constant factors stay outside the sums (a constant inside one is a whole
            # broadcast tensor to JAX's XLA:CPU, written out before its reduction)
            if ynn_reduces():   # sums YNNPACK fuses: no 0/1 tensor written out
                pull, count = total_sum(g_s * t), count_of_max(t, big)
                signed_ties = ops.cast(t == big, t.dtype) - ops.cast(t == -big, t.dtype)
            else:               # one pass (a variadic reduce under TensorFlow's XLA)
                ties = ops.cast(ops.abs(t) == big, t.dtype)
                pull, count = total_sums(g_s * t, ties)
                signed_ties = ops.sign(t) * ties
            g_big = ops.where(big >= 1e-12, -4.0 * pull / (two_m * two_m), 0.0)
            g_t = g_s * (2.0 / two_m) + signed_ties * (g_big / ops.maximum(count, 1.0))
            return g_t * (1.0 - t * t)

        return one_input(forward, backward, x, training)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits}
