"""EWGS layers: kquant layers with the paper's learnable per-layer output scale.

EWGS (Lee et al. 2021, §3.1) multiplies each quantized layer's convolution /
matmul output by a learnable α, initialised at the first forward pass as
``α₀ = E|o| / E|o_q|``, ``o = op(x, W)`` (full precision),
``o_q = op(Q_A(x), Q_W(W))``. As in the authors' code the layer applies
``|α|``, before the bias. ``output_scale_lr_multiplier`` m: ``α = α₀ + m·Δα``, so
with Adam α moves at m × the learning rate (the paper uses lr 1e-5 for α). Because ``op`` is linear in the kernel,
``|α|·op(x_q, w_q) = op(x_q, |α|·w_q)``: :meth:`quantized_kernel` returns the
scaled kernel, i.e. what inference actually uses.

The quantizers are ordinary kquant quantizers (typically
:class:`~kquant_ewgs.EWGSQuantizer` with ``kind="weight"`` / ``"activation"``),
so EWGS layers also work with other quantizers and estimators.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from kquant.layers import QuantConv2D, QuantDense
from kquant_ewgs._state import add_state, init_once


class OutputScale(keras.layers.Layer):
    """EWGS's per-layer output scale ``|α|``, ``α = α₀ + Δα``.

    ``α₀`` is a step statistic, written once from data by the optimizer's apply
    (the first finite training step it takes: :mod:`kquant_ewgs._state`); the
    trainable ``Δα`` starts at 0, so ``∂ℓ/∂Δα = ∂ℓ/∂α`` exactly. A sublayer of
    its EWGS layer, so it saves and loads beside the kernel.
    """

    def __init__(self, lr_multiplier=1.0, **kwargs):
        super().__init__(**kwargs)
        self.lr_multiplier = float(lr_multiplier)

    def build(self, input_shape=None):
        # the saved layout of files written when α₀ was non-trainable (offset first)
        self.offset = self.add_weight(name="offset", shape=(), initializer="zeros")
        self.init = add_state(self, "init", "ones")
        self.initialized = add_state(self, "initialized")
        self.built = True

    def value(self):
        """``|α|`` as a tensor."""
        return ops.abs(ops.convert_to_tensor(self.init) + self.lr_multiplier * self.offset)

    def apply_to(self, o_q, moments, training=None):
        """``|α|·o_q``; ``moments()`` gives ``E|o|, E|o_q|`` of the call's data and
        ``α₀ = E|o| / E|o_q|`` (global batch). α₀ is stored from the first finite batch
        of a training step the optimizer applies (see :mod:`kquant_ewgs._state`)."""
        def finish(m):
            num, den = m
            ratio = ops.where(den > 0, num / ops.maximum(den, 1e-12), 1.0)
            # a non-finite batch gives a non-finite estimate (never the fallback 1.0)
            ok = ops.logical_and(ops.isfinite(num), ops.isfinite(den))
            return [ops.where(ok, ratio, np.nan)]

        (alpha0,), commit = init_once([self.init], moments, 2, finish, self.initialized, training)
        alpha0 = ops.cast(alpha0, o_q.dtype)
        return commit(o_q * ops.abs(alpha0 + self.lr_multiplier * ops.cast(self.offset, o_q.dtype)))

    def call(self, o_q):
        raise TypeError("OutputScale is applied by its layer through `apply_to(o_q, estimate)`.")


class OutputScaleMixin:
    """Adds EWGS's output scale ``|α|`` (data-initialised) to a kquant quantized layer."""

    def __init__(self, *args, output_scale_lr_multiplier=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        m = float(output_scale_lr_multiplier)
        if not (m > 0 and math.isfinite(m)):
            raise ValueError(f"`output_scale_lr_multiplier` must be a positive float, got {m}.")
        self.output_scale_lr_multiplier = m
        self.output_scaler = OutputScale(lr_multiplier=m, name="output_scale")

    def get_config(self):
        return {**super().get_config(), "output_scale_lr_multiplier": self.output_scale_lr_multiplier}

    def _build_output_scale(self):
        self.output_scaler.build()

    @property
    def output_scale(self):
        """``|α|`` as a tensor."""
        return self.output_scaler.value()

    def quantized_kernel(self, training=None):
        """The kernel inference uses: ``|α|·Q_W(W)``."""
        return self.output_scale * super().quantized_kernel(training)

    def _scaled_linear(self, inputs, training):
        o_q = self._linear(self.quantized_inputs(inputs, training),
                           super().quantized_kernel(training))

        def moments():  # E|op(x, W)|, E|op(Q_A(x), Q_W(W))| of this replica's batch
            o = self._linear(ops.stop_gradient(inputs), ops.stop_gradient(self.latent_kernel))
            return [ops.mean(ops.abs(o)), ops.mean(ops.abs(ops.stop_gradient(o_q)))]

        return self.output_scaler.apply_to(o_q, moments, training)


@keras.saving.register_keras_serializable(package="kquant_ewgs")
class EWGSDense(OutputScaleMixin, QuantDense):
    """QuantDense with EWGS's learnable output scale: y = act(|α|·Q_A(x)Q_W(W) + b)."""

    def build(self, input_shape):
        super().build(input_shape)
        self._build_output_scale()

    def _linear(self, x, kernel):
        return ops.matmul(x, kernel)

    def call(self, inputs, training=None):
        x = self._scaled_linear(inputs, training)
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


@keras.saving.register_keras_serializable(package="kquant_ewgs")
class EWGSConv2D(OutputScaleMixin, QuantConv2D):
    """QuantConv2D with EWGS's learnable output scale: y = act(|α|·conv(Q_A(x), Q_W(W)) + b)."""

    def build(self, input_shape):
        super().build(input_shape)
        self._build_output_scale()

    def _linear(self, x, kernel):
        return self.convolution_op(x, kernel)

    def call(self, inputs, training=None):
        return self._add_bias_and_activate(self._scaled_linear(inputs, training), self.filters)
