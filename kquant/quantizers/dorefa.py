"""DoReFa k-bit weights (Zhou et al. 2016).

``W̃ = tanh(W) / (2·max|tanh W|) + ½``, ``Ŵ = 2·round((2^k−1)·W̃)/(2^k−1) − 1``.
The staircase coordinate is ``z = (2^k−1)·W̃`` with levels ``0..2^k−1``;
gradients flow through ``tanh`` and the max as in DoReFa's code.
(DoReFa activations are :class:`~kquant.quantizers.Uniform` with
``symmetric=False, step=1/(2^k−1)``.)
"""

from keras import ops

from kquant.quantizers.base import Quantizer, check_bits
from kquant.staircase import Staircase


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
        return 2.0 * q / (2**self.bits - 1) - 1.0

    def get_config(self):
        return {**super().get_config(), "bits": self.bits}
