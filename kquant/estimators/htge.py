"""Hyperbolic-tangent estimators: HTGE and DSQ (differentiable soft quantization).

HTGE ("custom estimators are STEs in disguise", Eq. for H) replaces ``round``
by ``H(z) = (a+b)/2 + tanh(t(z − (a+b)/2))/2``, ``a = ⌊z⌋``, ``b = ⌈z⌉``; in
the boundary distance ``s = 2(z − (a+b)/2)`` its slope is
``F'(s) = t/2 · (1 − tanh²(t·s/2))`` inside the range, 0 outside (the clip).

DSQ (Gong et al. 2019) uses ``φ(s) = k_s·tanh(k·s/2)``, ``k = ln(2/α − 1)``,
``k_s = 1/(1 − α)`` (so φ(±1) = ±1), in the forward pass as well during
training, with α ∈ (0, 1) learned (initial 0.2).
"""


from keras import ops

from kquant.estimators.base import ElementwiseEstimator
from kquant.validation import check_bool, check_number


class HTGE(ElementwiseEstimator):
    """HTGE: F'(s) = t/2 · (1 − tanh²(t s/2)) · 1{|s| ≤ 1}, sharpness t."""

    def __init__(self, t=5.0, **kwargs):
        super().__init__(**kwargs)
        self.t = check_number(t, "t", gt=0)

    def derivative(self, s):
        th = ops.tanh(self.t * s / 2.0)
        inside = ops.cast(ops.abs(s) <= 1.0, s.dtype)
        return self.t / 2.0 * (1.0 - th * th) * inside

    def surrogate(self, s):
        return ops.tanh(self.t * ops.clip(s, -1.0, 1.0) / 2.0)

    def get_config(self):
        return {"t": self.t}


class DSQ(ElementwiseEstimator):
    """DSQ: soft forward φ(s) = tanh(k s/2)/(1−α), k = ln(2/α − 1); α ∈ (0,1) learned."""

    def __init__(self, alpha=0.2, learn_alpha=True, soft_forward=True, **kwargs):
        super().__init__(**kwargs)
        self.alpha_init = check_number(alpha, "alpha", gt=0, lt=1)
        self.learn_alpha = check_bool(learn_alpha, "learn_alpha")
        self.soft_forward = check_bool(soft_forward, "soft_forward")

    def build(self, input_shape=None):
        self.alpha = self.add_weight(
            name="alpha",
            shape=(),
            initializer=lambda shape, dtype=None: ops.cast(self.alpha_init, dtype or "float32"),
            trainable=self.learn_alpha,
        )
        self.built = True

    def _alpha(self):
        return ops.clip(ops.convert_to_tensor(self.alpha), 1e-4, 1.0 - 1e-4)

    def _phi(self, s, alpha):
        k = ops.log(2.0 / alpha - 1.0)
        return ops.tanh(k * s / 2.0) / (1.0 - alpha)

    def derivative(self, s):
        alpha = ops.cast(self._alpha(), s.dtype)
        k = ops.log(2.0 / alpha - 1.0)
        th = ops.tanh(k * s / 2.0)
        inside = ops.cast(ops.abs(s) <= 1.0, s.dtype)
        return k / 2.0 * (1.0 - th * th) / (1.0 - alpha) * inside

    def surrogate(self, s):
        alpha = ops.cast(self._alpha(), s.dtype)
        return self._phi(ops.clip(s, -1.0, 1.0), alpha)

    def step(self, z, staircase, x=None, training=None):
        if not (self.soft_forward and training):
            return super().step(z, staircase, x=x, training=training)
        z = ops.convert_to_tensor(z)
        alpha = ops.cast(self._alpha(), z.dtype)
        s = staircase.distance(z)
        soft = staircase.boundary(z) + self._phi(s, alpha) * (staircase.width / 2.0)
        return ops.where(ops.abs(s) <= 1.0, soft, ops.stop_gradient(staircase.hard(z)))

    def get_config(self):
        return {
            "alpha": self.alpha_init,
            "learn_alpha": self.learn_alpha,
            "soft_forward": self.soft_forward,
        }


