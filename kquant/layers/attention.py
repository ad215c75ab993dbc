"""QuantMultiHeadAttention: Keras attention with quantized projections."""

import keras

from kquant import estimators, quantizers
from kquant.layers.base import check_input_quantizer, make_quantizer
from kquant.layers.dense import QuantEinsumDense

#: MultiHeadAttention's projection sublayers (``_gate_dense`` only with ``use_gate``).
PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_gate_dense", "_output_dense")


def _template(identifier, estimator, argument):
    """Validate a quantizer argument; keep a name/config, serialize an instance."""
    quantizer = make_quantizer(identifier, estimator, argument)
    if argument == "input_quantizer":
        check_input_quantizer(quantizer)
    if isinstance(identifier, quantizers.Quantizer):
        return quantizers.serialize(identifier)
    return identifier


@keras.saving.register_keras_serializable(package="kquant")
class QuantMultiHeadAttention(keras.layers.MultiHeadAttention):
    """``MultiHeadAttention`` whose query/key/value(/gate)/output projections are
    :class:`QuantEinsumDense` layers, each with its own copy of ``kernel_quantizer``
    and ``input_quantizer`` (applied to the projection's input).

    The projections keep Keras' names and weight layout, so the weights of a
    trained ``MultiHeadAttention`` carry over (see :func:`kquant.quantize_model`).
    """

    def __init__(self, num_heads, key_dim, kernel_quantizer=None, input_quantizer=None,
                 estimator=None, **kwargs):
        super().__init__(num_heads, key_dim, **kwargs)
        self.estimator = estimator
        self.kernel_quantizer_config = _template(kernel_quantizer, estimator, "kernel_quantizer")
        self.input_quantizer_config = _template(input_quantizer, estimator, "input_quantizer")

    def build(self, query_shape, value_shape, key_shape=None):
        super().build(query_shape, value_shape, key_shape)
        key_shape = value_shape if key_shape is None else key_shape
        attended = list(self._query_dense.compute_output_shape(query_shape))
        attended[-1] = self._value_dim
        inputs = {"_query_dense": query_shape, "_key_dense": key_shape,
                  "_value_dense": value_shape, "_gate_dense": query_shape,
                  "_output_dense": tuple(attended)}
        for attr in PROJECTIONS:  # swap each float EinsumDense for its quantized twin
            dense = getattr(self, attr, None)
            if dense is None:
                continue
            twin = QuantEinsumDense.from_config({
                **dense.get_config(),
                "kernel_quantizer": self.kernel_quantizer_config,
                "input_quantizer": self.input_quantizer_config,
                "estimator": self.estimator,
            })
            twin.build(tuple(inputs[attr]))
            self._tracker.untrack(dense)
            setattr(self, attr, twin)

    def get_config(self):
        estimator = self.estimator
        if isinstance(estimator, estimators.Estimator):
            estimator = estimators.serialize(estimator)
        return {**super().get_config(), "kernel_quantizer": self.kernel_quantizer_config,
                "input_quantizer": self.input_quantizer_config, "estimator": estimator}
