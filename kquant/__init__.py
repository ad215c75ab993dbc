"""kquant: quantization-aware training for Keras 3.

Quantized layers (:mod:`kquant.layers`) apply a forward quantizer
(:mod:`kquant.quantizers`) whose backward pass is a pluggable gradient
estimator (:mod:`kquant.estimators`, entry-point group ``kquant.estimators``).
"""

from kquant import (
    alq,
    analysis,
    callbacks,
    datasets,
    estimators,
    models,
    optimizers,
    quantizers,
    staircase,
)
from kquant.layers import (
    QuantConv1D,
    QuantConv2D,
    QuantDense,
    QuantDepthwiseConv2D,
)
from kquant.convert import quantize_model
from kquant.summary import summary
from kquant.quantizers import Quantizer, quantizer

__version__ = "0.1.0"

__all__ = [
    "QuantConv1D",
    "QuantConv2D",
    "QuantDense",
    "QuantDepthwiseConv2D",
    "Quantizer",
    "alq",
    "analysis",
    "callbacks",
    "optimizers",
    "estimators",
    "quantize_model",
    "summary",
    "quantizer",
    "datasets",
    "models",
    "quantizers",
    "staircase",
]
