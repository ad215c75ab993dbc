"""PACT: parameterized clipping activation (Choi et al. 2018).

``y = clip(x, 0, α)``, ``y_q = round(y·n/α)·α/n`` with ``n = 2^k − 1`` and a
learned clip level ``α`` (one per quantizer, initial ``alpha``). In kquant's
terms: the staircase ``0..n`` on ``z = x·n/α``, then ``post(q) = q·α/n``.

Gradients (the paper's Eqs. 2–3):

* ``x``: the estimator's slope on ``z``; the default ``"clipped_ste"`` gives
  PACT's ``∂y_q/∂x = 1{0 ≤ x ≤ α}``.
* ``α``: PACT's ``∂y_q/∂α = 1{x ≥ α}`` — the clip's derivative; the
  quantization error's own dependence on α is ignored (the paper's STE), so α
  is held constant inside ``pre``/``post`` and receives exactly this term,
  through an addend that is exactly 0 in the forward pass (present unless
  ``training=False``, so ``encode``/``decode`` stay exact).

``alpha_l2`` adds the paper's L2 penalty ``λ·α²`` to the layer's losses.
"""

import keras
from keras import ops

from kquant.quantizers.base import Quantizer, apply_slope, check_bits
from kquant.quantizers.fused import with_parameter
from kquant.reductions import total_sum
from kquant.staircase import Staircase
from kquant.validation import check_number


@keras.saving.register_keras_serializable(package="kquant")
class PACT(Quantizer):
    """PACT: round(clip(x, 0, α)·(2^k−1)/α)·α/(2^k−1), α learned (∂/∂α = 1{x ≥ α})."""

    default_estimator = "clipped_ste"

    def __init__(self, bits=4, alpha=10.0, alpha_l2=0.0, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.bits = check_bits(bits, "bits", 1, 16)
        self.alpha_init = check_number(alpha, "alpha", gt=0)
        self.alpha_l2 = check_number(alpha_l2, "alpha_l2", ge=0)

    @property
    def precision(self):
        return self.bits

    @property
    def staircase(self):
        return Staircase(0.0, float(2**self.bits - 1))

    def build(self, input_shape):
        self.alpha = self.add_weight(
            name="alpha", shape=(), initializer=keras.initializers.Constant(self.alpha_init),
            regularizer=keras.regularizers.L2(self.alpha_l2) if self.alpha_l2 > 0 else None,
        )
        super().build(input_shape)

    def _alpha(self, dtype):
        return ops.maximum(ops.cast(ops.convert_to_tensor(self.alpha), dtype), 1e-3)

    def pre(self, x, training=None):
        live = self._alpha(x.dtype)
        alpha = ops.stop_gradient(live)
        params = {"alpha": alpha}
        if training is not False:  # zero forward; carries ∂y_q/∂α = 1{x ≥ α} backward
            params["alpha_grad"] = ops.cast(x >= alpha, x.dtype) * (live - alpha)
        return x * float(2**self.bits - 1) / alpha, params

    def post(self, q, params):
        y = q * params["alpha"] / float(2**self.bits - 1)
        return y + params["alpha_grad"] if "alpha_grad" in params else y

    def fused(self, x, slope, training=None):
        """Training calls, in one custom-gradient function: ``y = a·step(x·n/a)/n``
        (``a = max(α, 10⁻³)``), ``∂ℓ/∂x = F'(s)·g``, ``∂ℓ/∂a = Σ g·1{x ≥ a}``.
        Inference takes ``pre``/``post``, as :meth:`encode` does."""
        if training is not True or not self._fusable(PACT):
            return None
        n, st = float(2**self.bits - 1), self.staircase

        def forward(x, a):
            return st.hard(x * n / a) * a / n

        def backward(g, x, a):
            g_x = apply_slope(g, slope, lambda: st.distance(x * n / a))
            return g_x, total_sum(ops.where(x >= a, g, ops.zeros_like(g)))

        return with_parameter(forward, backward, x, self._alpha(x.dtype), training)

    def extra_bits(self, shape):
        return 32

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "alpha": self.alpha_init,
                "alpha_l2": self.alpha_l2}
