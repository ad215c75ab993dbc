"""MAD, magnitude-aware derivative: STE inside the range, reciprocal decay outside."""

from keras import ops

from kquant.estimators.base import ElementwiseEstimator


class MAD(ElementwiseEstimator):
    """Magnitude-aware: F'(s) = 1 for |s| ≤ 1, 1/|s| outside (continuous at |s| = 1)."""

    def derivative(self, s):
        a = ops.abs(s)
        return ops.where(a <= 1.0, ops.ones_like(s), 1.0 / ops.maximum(a, 1.0))

    def surrogate(self, s):
        a = ops.abs(s)
        return ops.where(a <= 1.0, s, ops.sign(s) * (1.0 + ops.log(ops.maximum(a, 1.0))))
