"""MAD, magnitude-aware derivative (Sakr et al., ICML 2022, §4).

STE inside the clipping range, reciprocal decay outside it::

    dQ̂/dx = 1            for −c₋ ≤ x ≤ c₊
    dQ̂/dx = c / |x|      outside, c the clip bound on that side

``x`` is measured from the quantizer's zero, in step units ``z`` (levels
``lo..hi``), so ``c₊ = |hi|``, ``c₋ = |lo|`` (a range starting at 0, e.g. an
unsigned activation, has no lower tail: ``c₋ = 0``). In kquant's boundary
coordinate ``s`` (half steps, ``|s| = 1`` at the range's edge) the distance
past the edge is ``d = h·(|s| − 1)``, ``h = ½`` (multi-bit; ``h = 1`` for
``sign``, where ``s = x``), so ``F'(s) = c / (c + d)``. For ``sign``
(``c = 1``) this is ``1/|s|``; on a k-bit staircase it is *not* ``1/|s|``
(e.g. levels −2..1: at ``z = 2`` it is ½, at ``z = −3`` it is ⅔).
"""

from keras import ops

from kquant.estimators.base import ElementwiseEstimator


class MAD(ElementwiseEstimator):
    """Magnitude-aware (Sakr et al. 2022): F' = 1 on the range, c/|x| outside (c the clip bound)."""

    @staticmethod
    def _geometry(staircase):
        """``(c₋, c₊, h)`` of ``staircase``; default: the binary one (``1, 1, 1``)."""
        if staircase is None or staircase.binary:
            return 1.0, 1.0, 1.0
        return abs(float(staircase.lo)), abs(float(staircase.hi)), 0.5

    def derivative(self, s, staircase=None):
        c_lo, c_hi, h = self._geometry(staircase)
        a = ops.abs(s)
        c = ops.cast(ops.where(s > 0, c_hi, c_lo), s.dtype)
        tail = c / ops.maximum(c + h * (a - 1.0), 1e-30)
        return ops.where(a <= 1.0, ops.ones_like(s), ops.cast(tail, s.dtype))

    def surrogate(self, s, staircase=None):
        c_lo, c_hi, h = self._geometry(staircase)
        a = ops.abs(s)
        c = ops.cast(ops.where(s > 0, c_hi, c_lo), s.dtype)
        # ∫_1^a c / (c + h(u − 1)) du = (c/h)·log(1 + h(a − 1)/c)
        tail = 1.0 + c / h * ops.log(1.0 + h * ops.maximum(a - 1.0, 0.0) / ops.maximum(c, 1e-30))
        return ops.where(a <= 1.0, s, ops.sign(s) * ops.cast(tail, s.dtype))

    def context(self, z, q, staircase, x=None, training=None):
        return {"derivative": self.derivative(staircase.distance(z), staircase)}
