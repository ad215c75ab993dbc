"""Larq's API on kquant: ``import kquant_compat.larq as lq`` in place of ``import larq as lq``.

``lq.layers.QuantDense``/``QuantConv2D``, ``lq.quantizers.SteSign`` … and the
names ``"ste_sign"``, ``"approx_sign"``, ``"swish_sign"``, ``"magnitude_aware_sign"``,
``"ste_tern"``, ``"dorefa_quantizer"``, and ``lq.constraints.WeightClip``
(``kernel_constraint="weight_clip"``).
"""

from kquant_compat.larq import constraints, layers, quantizers
from kquant_compat.larq.constraints import WeightClip, weight_clip
from kquant_compat.larq.layers import QuantConv1D, QuantConv2D, QuantDense, QuantDepthwiseConv2D
from kquant_compat.larq.quantizers import (ApproxSign, DoReFa, DoReFaQuantizer,
                                           MagnitudeAwareSign, SteSign, SteTern, SwishSign)

__all__ = ["ApproxSign", "DoReFa", "DoReFaQuantizer", "MagnitudeAwareSign", "QuantConv1D",
           "QuantConv2D", "QuantDense", "QuantDepthwiseConv2D", "SteSign", "SteTern", "SwishSign",
           "WeightClip", "constraints", "layers", "quantizers", "weight_clip"]
