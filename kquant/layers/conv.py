"""Quantized convolutions: plain, depthwise, separable and transposed, 1-D to 3-D.

Per-channel kernel quantizers get the layer's output-channel axes: the last
for plain convolutions, ``(in, multiplier)`` (the last two) for depthwise
kernels, ``out`` (second to last) for transposed kernels ``(..., out, in)``.
"""

import keras
from keras import ops

from kquant.layers.base import (QuantizedLayerMixin, check_input_quantizer, make_quantizer,
                                quantizers)


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
class QuantConv3D(_QuantConvMixin, keras.layers.Conv3D):
    """3-D convolution with quantized kernel and inputs."""

    def __init__(self, filters, kernel_size, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)


class _QuantDepthwiseMixin(_QuantConvMixin):
    kernel_channel_axes = (-2, -1)  # (kernel..., in, multiplier): one scale per output

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


@keras.saving.register_keras_serializable(package="kquant")
class QuantDepthwiseConv1D(_QuantDepthwiseMixin, keras.layers.DepthwiseConv1D):
    """Depthwise 1-D convolution with quantized kernel and inputs."""


@keras.saving.register_keras_serializable(package="kquant")
class QuantDepthwiseConv2D(_QuantDepthwiseMixin, keras.layers.DepthwiseConv2D):
    """Depthwise 2-D convolution with quantized kernel and inputs."""


class _QuantConvTransposeMixin(_QuantConvMixin):
    kernel_channel_axes = (-2,)  # Keras' transposed kernels are (kernel..., out, in)

    def __init__(self, filters, kernel_size, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)

    def call(self, inputs, training=None):
        outputs = ops.conv_transpose(
            self.quantized_inputs(inputs, training), self.quantized_kernel(training),
            strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs, self.filters)


@keras.saving.register_keras_serializable(package="kquant")
class QuantConv1DTranspose(_QuantConvTransposeMixin, keras.layers.Conv1DTranspose):
    """Transposed 1-D convolution with quantized kernel and inputs."""


@keras.saving.register_keras_serializable(package="kquant")
class QuantConv2DTranspose(_QuantConvTransposeMixin, keras.layers.Conv2DTranspose):
    """Transposed 2-D convolution with quantized kernel and inputs."""


@keras.saving.register_keras_serializable(package="kquant")
class QuantConv3DTranspose(_QuantConvTransposeMixin, keras.layers.Conv3DTranspose):
    """Transposed 3-D convolution with quantized kernel and inputs."""


class _QuantSeparableMixin(_QuantConvMixin):
    """Separable convolution: the depthwise and the pointwise kernel each quantized.

    ``kernel_quantizer`` is a shorthand for the same quantizer (one copy each)
    on both kernels; ``depthwise_quantizer``/``pointwise_quantizer`` set them
    apart. ``latent_kernel``/``kernel_quantizer`` name the pointwise kernel;
    :meth:`quantized_kernels` lists both.
    """

    def __init__(self, filters, kernel_size, kernel_quantizer=None, depthwise_quantizer=None,
                 pointwise_quantizer=None, input_quantizer=None, estimator=None, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        if kernel_quantizer is not None:
            if depthwise_quantizer is not None or pointwise_quantizer is not None:
                raise ValueError(
                    "Give either `kernel_quantizer` (both kernels) or `depthwise_quantizer`/"
                    "`pointwise_quantizer`, not both."
                )
            depthwise_quantizer = kernel_quantizer
            pointwise_quantizer = (quantizers.serialize(kernel_quantizer)
                                   if isinstance(kernel_quantizer, quantizers.Quantizer)
                                   and estimator is None else kernel_quantizer)
        self.estimator = estimator
        self.depthwise_quantizer = make_quantizer(depthwise_quantizer, estimator,
                                                  "depthwise_quantizer")
        self.pointwise_quantizer = make_quantizer(pointwise_quantizer, estimator,
                                                  "pointwise_quantizer")
        self.input_quantizer = check_input_quantizer(
            make_quantizer(input_quantizer, estimator, "input_quantizer"))

    @property
    def kernel_quantizer(self):
        return self.pointwise_quantizer

    @property
    def latent_kernel(self):
        return self.pointwise_kernel

    def quantized_kernels(self):
        return [(self.depthwise_kernel, self.depthwise_quantizer),
                (self.pointwise_kernel, self.pointwise_quantizer)]

    def _kernel_axes(self, latent):
        return (-2, -1) if latent is self.depthwise_kernel else None

    def call(self, inputs, training=None):
        dq, pq = self.depthwise_quantizer, self.pointwise_quantizer
        depthwise = self.depthwise_kernel if dq is None else dq(self.depthwise_kernel,
                                                               training=training)
        pointwise = self.pointwise_kernel if pq is None else pq(self.pointwise_kernel,
                                                               training=training)
        outputs = ops.separable_conv(
            self.quantized_inputs(inputs, training), depthwise, pointwise,
            strides=self.strides, padding=self.padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._add_bias_and_activate(outputs, self.filters)

    def get_config(self):
        config = super().get_config()  # _QuantConvMixin adds kernel_quantizer: replace it
        config.pop("kernel_quantizer")
        config["depthwise_quantizer"] = quantizers.serialize(self.depthwise_quantizer)
        config["pointwise_quantizer"] = quantizers.serialize(self.pointwise_quantizer)
        return config


@keras.saving.register_keras_serializable(package="kquant")
class QuantSeparableConv1D(_QuantSeparableMixin, keras.layers.SeparableConv1D):
    """Separable 1-D convolution with quantized depthwise and pointwise kernels."""


@keras.saving.register_keras_serializable(package="kquant")
class QuantSeparableConv2D(_QuantSeparableMixin, keras.layers.SeparableConv2D):
    """Separable 2-D convolution with quantized depthwise and pointwise kernels."""
