"""QuantDense ``y = act(Q_in(x) · Q_k(W) + b)`` and QuantEinsumDense (its einsum form)."""

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


def einsum_output_axes(equation):
    """Kernel axes of an ``EinsumDense`` equation that index its outputs.

    ``"abc,cde->abde"``: kernel ``cde``, output ``abde`` → axes ``(1, 2)``.
    """
    try:
        inputs, output = equation.replace(" ", "").split("->")
        _, kernel = inputs.split(",")
    except ValueError:
        raise ValueError(f"`equation` must look like 'ab,bc->ac', got {equation!r}.") from None
    return tuple(i for i, letter in enumerate(kernel) if letter in output)


@keras.saving.register_keras_serializable(package="kquant")
class QuantEinsumDense(QuantizedLayerMixin, keras.layers.EinsumDense):
    """``EinsumDense`` with quantized kernel and inputs (transformer projections).

    Per-channel kernel quantizers get the kernel axes the output keeps
    (e.g. ``(heads, head_dim)`` for attention's query/key/value projections).
    """

    def __init__(self, equation, output_shape, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        einsum_output_axes(equation)  # a malformed equation fails here, naming `equation`
        self._init_quantizers(kernel_quantizer, input_quantizer, estimator)

    def _kernel_axes(self, latent):
        return einsum_output_axes(self.equation)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_quantizers(input_shape)

    def call(self, inputs, training=None):
        x = ops.einsum(self.equation, self.quantized_inputs(inputs, training),
                       self.quantized_kernel(training))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}
