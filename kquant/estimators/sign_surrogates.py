"""Sign surrogates from binary networks: ApproxSign (Bi-Real Net) and SwishSign (BNN+)."""

from keras import ops

from kquant.estimators.base import ElementwiseEstimator
from kquant.validation import check_number


class ApproxSign(ElementwiseEstimator):
    """ApproxSign (Liu et al. 2018, Bi-Real Net): F'(s) = (2 − 2|s|) · 1{|s| ≤ 1}."""

    def derivative(self, s):
        return ops.maximum(2.0 - 2.0 * ops.abs(s), 0.0)

    def surrogate(self, s):
        c = ops.clip(s, -1.0, 1.0)
        return 2.0 * c - c * ops.abs(c)


class SwishSign(ElementwiseEstimator):
    """SwishSign (Darabi et al. 2018, BNN+): F(s) = 2σ(βs)(1 + βs(1 − σ(βs))) − 1.

    F'(s) = β(2 − βs·tanh(βs/2)) / (1 + cosh(βs)).
    """

    def __init__(self, beta=5.0, **kwargs):
        super().__init__(**kwargs)
        self.beta = check_number(beta, "beta", gt=0)

    def derivative(self, s):
        bs = self.beta * s
        return self.beta * (2.0 - bs * ops.tanh(bs / 2.0)) / (1.0 + ops.cosh(bs))

    def surrogate(self, s):
        sig = ops.sigmoid(self.beta * s)
        return 2.0 * sig * (1.0 + self.beta * s * (1.0 - sig)) - 1.0

    def get_config(self):
        return {"beta": self.beta}
