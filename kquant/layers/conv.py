"""Quantized convolutions: QuantConv1D, QuantConv2D, QuantDepthwiseConv2D."""

import keras
from keras import ops

from kquant.layers.base import QuantizedLayerMixin


class _QuantConvMixin(QuantizedLayerMixin):
    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    @property
    def latent_kernel(self):
        return self.kernel

    def _add_bias_and_activate(self, outputs, channels):
        if self.use_bias:
            if self.data_format == "channels_last":
                shape = (1,) * (self.rank + 1) + (channels,)
            else:
                shape = (1, channels) + (1,) * self.rank
            outputs = ops.add(outputs, ops.reshape(self.bias, shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def call(self, inputs, training=None):
        outputs = self.convolution_op(
            self.quantized_inputs(inputs, training), self.quantized_kernel(training)
        )
        return self._add_bias_and_activate(outputs, self.filters)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="kquant")
class QuantConv1D(_QuantConvMixin, keras.layers.Conv1D):
    """1-D convolution with quantized kernel and inputs."""

    def __init__(self, filters, kernel_size, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)

    def call(self, inputs, training=None):
        x = self.quantized_inputs(inputs, training)
        padding = self.padding
        if padding == "causal":  # pad after quantizing, as Keras pads raw inputs
            x = ops.pad(x, self._compute_causal_padding())
            padding = "valid"
        outputs = ops.conv(
            x, self.quantized_kernel(training), strides=list(self.strides), padding=padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs, self.filters)


@keras.saving.register_keras_serializable(package="kquant")
class QuantConv2D(_QuantConvMixin, keras.layers.Conv2D):
    """2-D convolution with quantized kernel and inputs."""

    def __init__(self, filters, kernel_size, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)


@keras.saving.register_keras_serializable(package="kquant")
class QuantDepthwiseConv2D(_QuantConvMixin, keras.layers.DepthwiseConv2D):
    """Depthwise 2-D convolution with quantized kernel and inputs."""

    def __init__(self, kernel_size, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(kernel_size, **kwargs)
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)

    def call(self, inputs, training=None):
        channels = self._get_input_channel(inputs.shape) * self.depth_multiplier
        outputs = ops.depthwise_conv(
            self.quantized_inputs(inputs, training), self.quantized_kernel(training),
            strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs, channels)
