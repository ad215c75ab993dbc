"""What every quantized layer shares: its two quantizers and their bookkeeping.

A quantized layer keeps a latent float kernel, and in ``call`` uses
``kernel_quantizer(kernel)`` and ``input_quantizer(inputs)`` in place of them.
``estimator`` is the default backward rule of quantizers given by name.
"""

from __future__ import annotations

import math

from kquant import estimators, quantizers
from kquant.accounting import LayerStats


class QuantizedLayerMixin:
    """Mixin for Keras layers with a ``kernel``: adds kernel and input quantizers."""

    def _init_quantizers(self, kernel_quantizer, input_quantizer, estimator):
        self.estimator = estimator
        self.kernel_quantizer = quantizers.get(kernel_quantizer, estimator=estimator)
        self.input_quantizer = quantizers.get(input_quantizer, estimator=estimator)

    def _build_quantizers(self, input_shape):
        if self.kernel_quantizer is not None and not self.kernel_quantizer.built:
            self.kernel_quantizer.build(tuple(self.latent_kernel.shape))
        if self.input_quantizer is not None and not self.input_quantizer.built:
            self.input_quantizer.build(tuple(input_shape))

    @property
    def latent_kernel(self):
        """The float kernel variable the optimizer trains."""
        return self._kernel if hasattr(self, "_kernel") else self.kernel_variable

    def quantized_kernel(self, training=None):
        """The kernel the forward pass uses."""
        kernel = self.latent_kernel
        if self.kernel_quantizer is None:
            return kernel
        return self.kernel_quantizer(kernel, training=training)

    def quantized_inputs(self, inputs, training=None):
        if self.input_quantizer is None:
            return inputs
        return self.input_quantizer(inputs, training=training)

    def _quantizer_config(self):
        return {
            "kernel_quantizer": quantizers.serialize(self.kernel_quantizer),
            "input_quantizer": quantizers.serialize(self.input_quantizer),
            "estimator": (estimators.serialize(self.estimator)
                          if isinstance(self.estimator, estimators.Estimator) else self.estimator),
        }

    def quantization_stats(self) -> LayerStats:
        """Storage and MACs of this layer (kernel at its quantizer's precision)."""
        shape = tuple(self.latent_kernel.shape)
        n = math.prod(shape)
        kq, iq = self.kernel_quantizer, self.input_quantizer
        others = sum(math.prod(v.shape) for v in self.weights if v is not self.latent_kernel
                     and not _belongs_to(v, kq))
        try:
            out_shape = self.output.shape
            spatial = math.prod(d for d in out_shape[1:-1] if d is not None)
        except (AttributeError, ValueError):
            spatial = 1
        return LayerStats(
            name=self.name,
            kind=type(self).__name__,
            kernel_params=n,
            kernel_bits=float(kq.precision) if kq is not None else 32.0,
            float_params=others,
            extra_bits=kq.extra_bits(shape) if kq is not None else 0,
            input_bits=float(iq.precision) if iq is not None else None,
            macs=n * spatial,
            notes=type(kq).__name__ if kq is not None else "float kernel",
        )


def _belongs_to(variable, quantizer):
    return quantizer is not None and any(variable is w for w in quantizer.weights)
