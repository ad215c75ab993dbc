"""Larq's quantized layers: kquant's, taking Larq's quantizer names (``"ste_sign"``, through
kquant's registry) and constraint names (``kernel_constraint="weight_clip"``)."""

import keras

import kquant.layers
from kquant_compat.larq import constraints


def _larq_constraints(kwargs):
    for key in ("kernel_constraint", "bias_constraint", "depthwise_constraint"):
        if key in kwargs:
            kwargs[key] = constraints.get(kwargs[key])
    return kwargs


@keras.saving.register_keras_serializable(package="kquant_compat")
class QuantDense(kquant.layers.QuantDense):
    """Larq QuantDense: ``input_quantizer``, ``kernel_quantizer``, ``kernel_constraint``."""

    def __init__(self, units, **kwargs):
        super().__init__(units, **_larq_constraints(kwargs))


@keras.saving.register_keras_serializable(package="kquant_compat")
class QuantConv1D(kquant.layers.QuantConv1D):
    """Larq QuantConv1D."""

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(filters, kernel_size, **_larq_constraints(kwargs))


@keras.saving.register_keras_serializable(package="kquant_compat")
class QuantConv2D(kquant.layers.QuantConv2D):
    """Larq QuantConv2D."""

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(filters, kernel_size, **_larq_constraints(kwargs))


@keras.saving.register_keras_serializable(package="kquant_compat")
class QuantDepthwiseConv2D(kquant.layers.QuantDepthwiseConv2D):
    """Larq QuantDepthwiseConv2D."""

    def __init__(self, kernel_size, **kwargs):
        super().__init__(kernel_size, **_larq_constraints(kwargs))


__all__ = ["QuantConv1D", "QuantConv2D", "QuantDense", "QuantDepthwiseConv2D"]
