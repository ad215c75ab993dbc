"""QuantDense: ``y = act(Q_in(x) · Q_k(W) + b)``."""

import keras
from keras import ops

from kquant.layers.base import QuantizedLayerMixin


@keras.saving.register_keras_serializable(package="kquant")
class QuantDense(QuantizedLayerMixin, keras.layers.Dense):
    """Dense layer with quantized kernel and (optionally) quantized inputs."""

    def __init__(self, units, kernel_quantizer=None, input_quantizer=None, estimator=None, **kwargs):
        super().__init__(units, **kwargs)
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        x = ops.matmul(self.quantized_inputs(inputs, training), self.quantized_kernel(training))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}
