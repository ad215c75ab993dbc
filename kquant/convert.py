"""Float model → quantized twin, keeping the trained weights."""

from __future__ import annotations

import keras

from kquant import quantizers
from kquant.layers import QUANTIZED_TWINS


def _fresh(quantizer):
    """A new quantizer instance per layer (string, dict or instance as template)."""
    if quantizer is None or isinstance(quantizer, (str, dict)):
        return quantizer
    return quantizers.serialize(quantizer)


def quantize_model(model, kernel_quantizer="sign", input_quantizer=None, estimator=None,
                   skip_first=False, skip_last=False, quantize_model_input=False,
                   layer_filter=None):
    """Replace Dense/Conv1D/Conv2D/DepthwiseConv2D by their kquant twins.

    ``kernel_quantizer``/``input_quantizer``/``estimator`` are as for the
    layers (a quantizer instance is used as a template, one copy per layer).
    ``skip_first``/``skip_last`` keep the first/last convertible layer float
    (common practice for binary nets); the first converted layer does not
    quantize the raw model input unless ``quantize_model_input``.
    ``layer_filter(layer) -> bool`` restricts conversion further.
    Weights are copied, so the twin starts where the float model stands.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    candidates = [
        layer for layer in model.layers
        if type(layer).__name__ in QUANTIZED_TWINS and (layer_filter is None or layer_filter(layer))
    ]
    if not candidates:
        raise ValueError("`model` has no Dense/Conv1D/Conv2D/DepthwiseConv2D layer to quantize.")
    chosen = list(candidates)
    if skip_first:
        chosen = chosen[1:]
    if skip_last and chosen and chosen[-1] is candidates[-1]:
        chosen = chosen[:-1]
    chosen_ids = {id(layer) for layer in chosen}
    first_id = id(candidates[0])

    def clone(layer):
        if id(layer) not in chosen_ids:
            return layer.__class__.from_config(layer.get_config())
        config = layer.get_config()
        config["kernel_quantizer"] = _fresh(kernel_quantizer)
        reads_input = id(layer) == first_id
        config["input_quantizer"] = (
            None if reads_input and not quantize_model_input else _fresh(input_quantizer)
        )
        config["estimator"] = estimator
        twin = QUANTIZED_TWINS[type(layer).__name__]
        if twin.__name__ == "QuantDepthwiseConv2D":
            config.pop("kernel_initializer", None)
        return twin.from_config(config)

    new = keras.models.clone_model(model, clone_function=clone)
    for old_layer, new_layer in zip(model.layers, new.layers):
        by_name = {v.path.split("/")[-1]: v for v in new_layer.weights}
        for v in old_layer.weights:
            key = v.path.split("/")[-1]
            if key in by_name and tuple(by_name[key].shape) == tuple(v.shape):
                # a copy: on JAX, assign(v) would share v's buffer, which the twin's
                # training step then donates, deleting the float model's weights
                by_name[key].assign(keras.ops.copy(v))
    return new
