"""Quantized Keras layers."""

from kquant.layers.base import QuantizedLayerMixin
from kquant.layers.conv import QuantConv1D, QuantConv2D, QuantDepthwiseConv2D
from kquant.layers.dense import QuantDense

QUANTIZED_TWINS = {
    "Dense": QuantDense,
    "Conv1D": QuantConv1D,
    "Conv2D": QuantConv2D,
    "DepthwiseConv2D": QuantDepthwiseConv2D,
}

__all__ = ["QUANTIZED_TWINS", "QuantConv1D", "QuantConv2D", "QuantDense",
           "QuantDepthwiseConv2D", "QuantizedLayerMixin"]
