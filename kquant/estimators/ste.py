"""Straight-through estimators (Bengio et al. 2013; Hubara et al. 2016)."""

from keras import ops

from kquant.estimators.base import ElementwiseEstimator


class STE(ElementwiseEstimator):
    """Straight-through: g_x = g_q everywhere (F'(s) = 1)."""

    def derivative(self, s):
        return ops.ones_like(s)

    def surrogate(self, s):
        return s


class ClippedSTE(ElementwiseEstimator):
    """Clipped STE / PWL: g_x = g_q · 1{|s| ≤ clip} (binary: |x| ≤ 1)."""

    def __init__(self, clip=1.0, **kwargs):
        super().__init__(**kwargs)
        clip = float(clip)
        if not clip > 0:
            raise ValueError(f"ClippedSTE: `clip` must be > 0, got {clip}.")
        self.clip = clip

    def derivative(self, s):
        return ops.cast(ops.abs(s) <= self.clip, s.dtype)

    def surrogate(self, s):
        return ops.clip(s, -self.clip, self.clip)

    def get_config(self):
        return {"clip": self.clip}
