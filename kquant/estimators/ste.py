"""Straight-through estimators (Bengio et al. 2013; Hubara et al. 2016)."""

from keras import ops

from kquant.estimators.base import ElementwiseEstimator
from kquant.validation import check_number


class STE(ElementwiseEstimator):
    """Straight-through: g_x = g_q everywhere (F'(s) = 1)."""

    def derivative(self, s):
        return ops.ones_like(s)

    def context(self, z, q, staircase, x=None, training=None):
        return {}

    def gradient(self, upstream, ctx):  # F' = 1: the upstream gradient itself, no pass
        return upstream

    def surrogate(self, s):
        return s

    def fused_slope(self):
        return None if self.variables else 1.0


class ClippedSTE(ElementwiseEstimator):
    """Clipped STE / PWL: g_x = g_q · 1{|s| ≤ clip} (binary: |x| ≤ 1)."""

    def __init__(self, clip=1.0, **kwargs):
        super().__init__(**kwargs)
        self.clip = check_number(clip, "clip", gt=0)

    def derivative(self, s):
        return ops.cast(ops.abs(s) <= self.clip, s.dtype)

    def surrogate(self, s):
        return ops.clip(s, -self.clip, self.clip)

    def get_config(self):
        return {"clip": self.clip}
