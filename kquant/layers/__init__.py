"""Quantized Keras layers."""

from kquant.layers.activation import QuantActivation
from kquant.layers.attention import QuantMultiHeadAttention
from kquant.layers.base import QuantizedLayerMixin
from kquant.layers.conv import (QuantConv1D, QuantConv1DTranspose, QuantConv2D,
                                QuantConv2DTranspose, QuantConv3D, QuantConv3DTranspose,
                                QuantDepthwiseConv1D, QuantDepthwiseConv2D,
                                QuantSeparableConv1D, QuantSeparableConv2D)
from kquant.layers.dense import QuantDense, QuantEinsumDense
from kquant.layers.recurrent import QuantGRU, QuantGRUCell, QuantLSTM, QuantLSTMCell

#: Keras layer class name → its quantized twin (same config plus quantizers).
QUANTIZED_TWINS = {
    "Dense": QuantDense,
    "EinsumDense": QuantEinsumDense,
    "Conv1D": QuantConv1D,
    "Conv2D": QuantConv2D,
    "Conv3D": QuantConv3D,
    "DepthwiseConv1D": QuantDepthwiseConv1D,
    "DepthwiseConv2D": QuantDepthwiseConv2D,
    "SeparableConv1D": QuantSeparableConv1D,
    "SeparableConv2D": QuantSeparableConv2D,
    "Conv1DTranspose": QuantConv1DTranspose,
    "Conv2DTranspose": QuantConv2DTranspose,
    "Conv3DTranspose": QuantConv3DTranspose,
    "LSTM": QuantLSTM,
    "GRU": QuantGRU,
    "MultiHeadAttention": QuantMultiHeadAttention,
}

__all__ = ["QUANTIZED_TWINS", "QuantActivation", "QuantConv1D", "QuantConv1DTranspose",
           "QuantConv2D", "QuantConv2DTranspose", "QuantConv3D", "QuantConv3DTranspose",
           "QuantDense", "QuantDepthwiseConv1D", "QuantDepthwiseConv2D", "QuantEinsumDense",
           "QuantGRU", "QuantGRUCell", "QuantLSTM", "QuantLSTMCell", "QuantMultiHeadAttention",
           "QuantSeparableConv1D", "QuantSeparableConv2D", "QuantizedLayerMixin"]
