"""QuantActivation: an activation quantizer used as a layer, ``y = Q(x)``.

Importing this module also registers kquant's built-in quantizer classes as
Keras-serializable (``kquant>Sign`` …), so a bare quantizer used as a layer
saves and reloads too.
"""

import keras

from kquant import estimators, quantizers
from kquant.layers.base import check_input_quantizer, make_quantizer, set_channel_axes


def _builtin_quantizer_classes():
    return [obj for obj in (getattr(quantizers, name) for name in quantizers.__all__)
            if isinstance(obj, type) and issubclass(obj, quantizers.Quantizer)
            and obj is not quantizers.Quantizer]


def register_quantizer_classes(classes=None):
    """Make quantizer classes (default: kquant's own) reloadable by Keras as model layers."""
    for cls in _builtin_quantizer_classes() if classes is None else classes:
        if keras.saving.get_registered_name(cls) == cls.__name__:  # not registered yet
            keras.saving.register_keras_serializable(package="kquant")(cls)


register_quantizer_classes()


@keras.saving.register_keras_serializable(package="kquant")
class QuantActivation(keras.layers.Layer):
    """Applies ``quantizer`` (a name, config or instance) to its inputs.

    ``estimator`` is the backward rule when the quantizer is given by name.
    A per-channel quantizer uses the last axis, or axis 1 with
    ``data_format="channels_first"``.
    """

    def __init__(self, quantizer, estimator=None, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        if quantizer is None:
            raise ValueError("QuantActivation: `quantizer` is required (a name such as "
                             "'sign', a config or a Quantizer), got None.")
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError("QuantActivation: `data_format` must be 'channels_last' or "
                             f"'channels_first', got {data_format!r}.")
        self.estimator = estimator
        self.data_format = data_format
        self.quantizer = check_input_quantizer(
            make_quantizer(quantizer, estimator, "quantizer"), "quantizer")

    def build(self, input_shape):
        if not self.quantizer.built:
            axes = (1,) if self.data_format == "channels_first" else None
            set_channel_axes(self.quantizer, tuple(input_shape), axes)
            self.quantizer.build(tuple(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        return self.quantizer(inputs, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        estimator = self.estimator
        if isinstance(estimator, estimators.Estimator):
            estimator = estimators.serialize(estimator)
        return {**super().get_config(), "quantizer": quantizers.serialize(self.quantizer),
                "estimator": estimator, "data_format": self.data_format}
