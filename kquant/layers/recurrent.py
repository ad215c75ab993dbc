"""QuantLSTM and QuantGRU: quantized input kernel and recurrent kernel (QKeras' QLSTM/QGRU).

Each layer quantizes its kernels once per call, outside the time loop, and
always runs Keras' generic RNN loop: the fused cuDNN kernels read the float
variables directly, so ``use_cudnn=True`` is refused. ``input_quantizer``
quantizes the input sequence; per-channel kernel quantizers use the last
axis (one scale per gate unit).
"""

import keras
from keras import ops

from kquant import estimators, quantizers
from kquant.layers.base import (QuantizedLayerMixin, check_input_quantizer, make_quantizer,
                                set_channel_axes)


class _QuantCellMixin:
    """Quantizers of a recurrent cell: ``kernel``, ``recurrent_kernel`` and inputs."""

    def _init_quantizers(self, kernel_quantizer, recurrent_quantizer, input_quantizer,
                         estimator):
        self.estimator = estimator
        self.kernel_quantizer = make_quantizer(kernel_quantizer, estimator, "kernel_quantizer")
        self.recurrent_quantizer = make_quantizer(recurrent_quantizer, estimator,
                                                  "recurrent_quantizer")
        self.input_quantizer = check_input_quantizer(
            make_quantizer(input_quantizer, estimator, "input_quantizer"))
        self._given_kernels = None  # set by QuantLSTM/QuantGRU around the time loop

    def build(self, input_shape):
        super().build(input_shape)
        for variable, quantizer in ((self.kernel, self.kernel_quantizer),
                                    (self.recurrent_kernel, self.recurrent_quantizer)):
            if quantizer is not None and not quantizer.built:
                set_channel_axes(quantizer, tuple(variable.shape), None)
                quantizer.build(tuple(variable.shape))
        if self.input_quantizer is not None and not self.input_quantizer.built:
            self.input_quantizer.build(tuple(input_shape))

    def quantize_kernels(self, training=None):
        """``(Q(kernel), Q(recurrent_kernel))`` for this step or call."""
        def q(quantizer, variable):
            return variable if quantizer is None else quantizer(variable, training=training)
        return (q(self.kernel_quantizer, self.kernel),
                q(self.recurrent_quantizer, self.recurrent_kernel))

    def _step_operands(self, inputs, training):
        if self._given_kernels is not None:  # the layer already quantized inputs and kernels
            return (inputs, *self._given_kernels)
        if self.input_quantizer is not None:
            inputs = self.input_quantizer(inputs, training=training)
        return (inputs, *self.quantize_kernels(training))

    def get_config(self):
        return {**super().get_config(), **_serialize(
            self.kernel_quantizer, self.recurrent_quantizer, self.input_quantizer, self.estimator)}


def _serialize(kernel_quantizer, recurrent_quantizer, input_quantizer, estimator):
    if isinstance(estimator, estimators.Estimator):
        estimator = estimators.serialize(estimator)
    return {"kernel_quantizer": quantizers.serialize(kernel_quantizer),
            "recurrent_quantizer": quantizers.serialize(recurrent_quantizer),
            "input_quantizer": quantizers.serialize(input_quantizer),
            "estimator": estimator}


@keras.saving.register_keras_serializable(package="kquant")
class QuantLSTMCell(_QuantCellMixin, keras.layers.LSTMCell):
    """LSTM cell with quantized kernel, recurrent kernel and inputs."""

    def __init__(self, units, kernel_quantizer=None, recurrent_quantizer=None,
                 input_quantizer=None, estimator=None, **kwargs):
        super().__init__(units, **kwargs)
        self._init_quantizers(kernel_quantizer, recurrent_quantizer, input_quantizer, estimator)

    def call(self, inputs, states, training=False):
        h_tm1, c_tm1 = states[0], states[1]
        inputs, kernel, recurrent_kernel = self._step_operands(inputs, training)
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        if training and 0.0 < self.recurrent_dropout < 1.0:
            h_tm1 = h_tm1 * self.get_recurrent_dropout_mask(h_tm1)
        z = ops.add(ops.matmul(inputs, kernel), ops.matmul(h_tm1, recurrent_kernel))
        if self.use_bias:
            z = ops.add(z, self.bias)
        c, o = self._compute_carry_and_output_fused(ops.split(z, 4, axis=1), c_tm1)
        h = o * self.activation(c)
        return h, [h, c]


@keras.saving.register_keras_serializable(package="kquant")
class QuantGRUCell(_QuantCellMixin, keras.layers.GRUCell):
    """GRU cell with quantized kernel, recurrent kernel and inputs."""

    def __init__(self, units, kernel_quantizer=None, recurrent_quantizer=None,
                 input_quantizer=None, estimator=None, **kwargs):
        super().__init__(units, **kwargs)
        self._init_quantizers(kernel_quantizer, recurrent_quantizer, input_quantizer, estimator)

    def call(self, inputs, states, training=False):
        h_tm1 = states[0] if isinstance(states, (list, tuple)) else states
        inputs, kernel, recurrent_kernel = self._step_operands(inputs, training)
        u = self.units
        input_bias = recurrent_bias = None
        if self.use_bias:
            if self.reset_after:
                input_bias, recurrent_bias = self.bias[0], self.bias[1]
            else:
                input_bias = self.bias
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        h_rec = h_tm1
        if training and 0.0 < self.recurrent_dropout < 1.0:
            h_rec = h_tm1 * self.get_recurrent_dropout_mask(h_tm1)
        matrix_x = ops.matmul(inputs, kernel)
        if input_bias is not None:
            matrix_x = ops.add(matrix_x, input_bias)
        x_z, x_r, x_h = ops.split(matrix_x, 3, axis=-1)
        if self.reset_after:
            inner = ops.matmul(h_rec, recurrent_kernel)
            if recurrent_bias is not None:
                inner = ops.add(inner, recurrent_bias)
        else:
            inner = ops.matmul(h_rec, recurrent_kernel[:, : 2 * u])
        z = self.recurrent_activation(x_z + inner[:, :u])
        r = self.recurrent_activation(x_r + inner[:, u: 2 * u])
        if self.reset_after:
            recurrent_h = r * inner[:, 2 * u:]
        else:
            recurrent_h = ops.matmul(r * h_rec, recurrent_kernel[:, 2 * u:])
        hh = self.activation(x_h + recurrent_h)
        h = z * h_tm1 + (1 - z) * hh
        return h, ([h] if isinstance(states, (list, tuple)) else h)


class _QuantRecurrentMixin(QuantizedLayerMixin):
    """A Keras LSTM/GRU layer running a quantized cell through the generic loop."""

    cell_class = None

    def _swap_cell(self, kernel_quantizer, recurrent_quantizer, input_quantizer, estimator):
        if self.use_cudnn is True:
            raise ValueError(
                f"{type(self).__name__}: `use_cudnn=True` is not supported: cuDNN's fused "
                "kernel would read the float weights and bypass the quantizers."
            )
        self.use_cudnn = False
        float_cell = self.cell
        cell = self.cell_class(**{
            **float_cell.get_config(), "kernel_quantizer": kernel_quantizer,
            "recurrent_quantizer": recurrent_quantizer, "input_quantizer": input_quantizer,
            "estimator": estimator,
        })
        self._tracker.untrack(float_cell)
        self.cell = cell

    # quantizers and kernels live in the cell; the layer exposes them
    @property
    def kernel_quantizer(self):
        return self.cell.kernel_quantizer

    @property
    def recurrent_quantizer(self):
        return self.cell.recurrent_quantizer

    @property
    def input_quantizer(self):
        return self.cell.input_quantizer

    @property
    def estimator(self):
        return self.cell.estimator

    @property
    def latent_kernel(self):
        return self.cell.kernel

    def quantized_kernels(self):
        """``[(kernel, kernel_quantizer), (recurrent_kernel, recurrent_quantizer)]``."""
        return [(self.cell.kernel, self.cell.kernel_quantizer),
                (self.cell.recurrent_kernel, self.cell.recurrent_quantizer)]

    def inner_loop(self, sequences, initial_state, mask, training=False):
        cell = self.cell
        sequences = self.quantized_inputs(sequences, training)
        # quantize once per call; the cell's steps read these tensors
        object.__setattr__(cell, "_given_kernels", cell.quantize_kernels(training))
        try:
            return keras.layers.RNN.inner_loop(self, sequences, initial_state, mask=mask,
                                               training=training)
        finally:
            object.__setattr__(cell, "_given_kernels", None)

    def get_config(self):
        config = super().get_config()
        config.pop("use_cudnn", None)
        return {**config, **_serialize(self.kernel_quantizer, self.recurrent_quantizer,
                                       self.input_quantizer, self.cell.estimator)}


@keras.saving.register_keras_serializable(package="kquant")
class QuantLSTM(_QuantRecurrentMixin, keras.layers.LSTM):
    """``keras.layers.LSTM`` with quantized ``kernel``, ``recurrent_kernel`` and inputs."""

    cell_class = QuantLSTMCell

    def __init__(self, units, kernel_quantizer=None, recurrent_quantizer=None,
                 input_quantizer=None, estimator=None, use_cudnn=False, **kwargs):
        super().__init__(units, use_cudnn=use_cudnn, **kwargs)
        self._swap_cell(kernel_quantizer, recurrent_quantizer, input_quantizer, estimator)


@keras.saving.register_keras_serializable(package="kquant")
class QuantGRU(_QuantRecurrentMixin, keras.layers.GRU):
    """``keras.layers.GRU`` with quantized ``kernel``, ``recurrent_kernel`` and inputs."""

    cell_class = QuantGRUCell

    def __init__(self, units, kernel_quantizer=None, recurrent_quantizer=None,
                 input_quantizer=None, estimator=None, use_cudnn=False, **kwargs):
        super().__init__(units, use_cudnn=use_cudnn, **kwargs)
        self._swap_cell(kernel_quantizer, recurrent_quantizer, input_quantizer, estimator)
