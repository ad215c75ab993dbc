"""What every quantized layer shares: its two quantizers and their bookkeeping.

A quantized layer keeps a latent float kernel, and in ``call`` uses
``kernel_quantizer(kernel)`` and ``input_quantizer(inputs)`` in place of them.
``estimator`` is the default backward rule of quantizers given by name.
"""

from __future__ import annotations

import math

from kquant import estimators, quantizers
from kquant.accounting import LayerStats
from kquant.quantizers import channels


def make_quantizer(identifier, estimator, argument):
    """``quantizers.get`` for a layer argument; ``estimator`` only with names or dicts."""
    if estimator is not None and isinstance(identifier, quantizers.Quantizer):
        raise ValueError(
            f"`estimator` applies to quantizers given by name or config; `{argument}` is a "
            f"{type(identifier).__name__} instance: give it the estimator itself "
            f"(e.g. kquant.quantizer(\"sign\", estimator=...)) or drop `estimator`."
        )
    return quantizers.get(identifier, estimator=estimator)


def check_input_quantizer(quantizer, argument="input_quantizer"):
    """Refuse whole-tensor estimators on activations: they would mix the batch."""
    if quantizer is not None and getattr(quantizer.estimator, "whole_tensor", False):
        raise ValueError(
            f"`{argument}`: {type(quantizer.estimator).__name__} is a whole-tensor estimator "
            "and would mix gradients across the examples of a batch; use it for kernels "
            "only and give the input quantizer an elementwise estimator."
        )
    return quantizer


def set_channel_axes(quantizer, shape, axes):
    """Tell a per-channel ``quantizer`` the channel ``axes`` of the tensor it will see.

    Quantizers without a ``channel_axes`` notion, per-tensor ones and ones given
    explicit axes are left alone.
    """
    if (quantizer is None or not getattr(quantizer, "per_channel", False)
            or not hasattr(quantizer, "channel_axes") or quantizer.channel_axes is not None):
        return
    quantizer.channel_axes = channels.resolve(len(shape), axes)


class QuantizedLayerMixin:
    """Mixin for Keras layers with a ``kernel``: adds kernel and input quantizers.

    A layer with several quantized kernels (separable convolutions, recurrent
    layers) overrides :meth:`quantized_kernels`; ``latent_kernel`` and
    ``kernel_quantizer`` then name its main kernel.
    """

    #: Channel axes of the kernel for per-channel quantizers (``None``: last axis).
    kernel_channel_axes = None

    def _init_quantizers(self, kernel_quantizer, input_quantizer, estimator):
        self.estimator = estimator
        self.kernel_quantizer = make_quantizer(kernel_quantizer, estimator, "kernel_quantizer")
        self.input_quantizer = check_input_quantizer(
            make_quantizer(input_quantizer, estimator, "input_quantizer"))

    def input_channel_axes(self):
        """Channel axis of the inputs: 1 for ``channels_first``, else the last."""
        return (1,) if getattr(self, "data_format", None) == "channels_first" else None

    def _kernel_axes(self, latent):
        """Channel axes of one of :meth:`quantized_kernels`' variables."""
        return self.kernel_channel_axes

    def _build_quantizers(self, input_shape):
        for latent, quantizer in self.quantized_kernels():
            if quantizer is not None and not quantizer.built:
                shape = tuple(latent.shape)
                set_channel_axes(quantizer, shape, self._kernel_axes(latent))
                quantizer.build(shape)
            if quantizer is not None:  # routes Bop's "binary_kernels" (kquant.optimizers)
                from kquant.optimizers.predicates import is_binary_quantizer, mark_binary

                mark_binary(latent, is_binary_quantizer(quantizer))
        if self.input_quantizer is not None and not self.input_quantizer.built:
            set_channel_axes(self.input_quantizer, tuple(input_shape), self.input_channel_axes())
            self.input_quantizer.build(tuple(input_shape))

    def quantized_kernels(self):
        """Every quantized kernel as ``(latent_variable, quantizer)`` (quantizer may be None)."""
        return [(self.latent_kernel, self.kernel_quantizer)]

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
        pairs = self.quantized_kernels()
        sizes = [math.prod(tuple(v.shape)) for v, _ in pairs]
        n = sum(sizes)
        kq, iq = self.kernel_quantizer, self.input_quantizer
        bits = sum(s * (float(q.precision) if q is not None else 32.0)
                   for s, (_, q) in zip(sizes, pairs)) / max(n, 1)
        extra = sum(q.extra_bits(tuple(v.shape)) for v, q in pairs if q is not None)
        latents = [v for v, _ in pairs]
        others = sum(math.prod(v.shape) for v in self.weights
                     if not any(v is w for w in latents)
                     and not any(_belongs_to(v, q) for _, q in pairs))
        try:
            out_shape = self.output.shape
            spatial = math.prod(d for d in out_shape[1:-1] if d is not None)
        except (AttributeError, ValueError):
            spatial = 1
        return LayerStats(
            name=self.name,
            kind=type(self).__name__,
            kernel_params=n,
            kernel_bits=bits,
            float_params=others,
            extra_bits=extra,
            input_bits=float(iq.precision) if iq is not None else None,
            macs=n * spatial,
            notes=type(kq).__name__ if kq is not None else "float kernel",
        )


def _belongs_to(variable, quantizer):
    return quantizer is not None and any(variable is w for w in quantizer.weights)
