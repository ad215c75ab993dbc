"""Trained float model → ALQ model, initialised by structured sketching (Alg. 1)."""

from __future__ import annotations

import keras
import numpy as np

from kquant.alq import groups as group_lib
from kquant.alq import sketching
from kquant.alq.activations import ALQActivation
from kquant.alq.layers import ALQConv2D, ALQDense

PAPER_GROUPS = {"Dense": "channel", "Conv2D": "pixel"}


def _group_for(layer, group):
    if group is None:
        return PAPER_GROUPS[type(layer).__name__]
    if isinstance(group, dict):
        return group.get(layer.name, PAPER_GROUPS[type(layer).__name__])
    if callable(group):
        return group(layer)
    return group


def quantize(model, group=None, max_bits=6, sigma=1e-6, activation_bits=None, layer_filter=None):
    """Replace every ``Dense``/``Conv2D`` (first and last included) by ALQ twins.

    Args:
        group: ``None`` (the paper's structures: conv pixel-wise, dense
            channel-wise), one structure for all layers (``"pixel"``,
            ``"kernel"``, ``"channel"``, ``"subchannel(k)"`` or an int ``k``),
            a dict ``{layer name: structure}``, or ``callable(layer) -> structure``.
        max_bits: ``I_max`` in [1, 8]. sigma: relative squared error at which
            sketching stops adding bases.
        activation_bits: if set, every converted layer but the first quantizes its
            (post-ReLU) input with :class:`ALQActivation` of this global bitwidth.
        layer_filter: ``callable(layer) -> bool`` restricting the conversion.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    max_bits = sketching.check_max_bits(max_bits)
    sigma = sketching.check_sigma(sigma)
    if group is not None and not isinstance(group, dict) and not callable(group):
        group_lib.parse(group)
    chosen = [l for l in model.layers if type(l).__name__ in PAPER_GROUPS
              and (layer_filter is None or layer_filter(l))]
    if not chosen:
        raise ValueError("`model` has no Dense/Conv2D layer to quantize.")
    for layer in chosen:
        if type(layer).__name__ == "Conv2D" and (layer.groups != 1 or
                                                 layer.data_format != "channels_last"):
            raise ValueError(f"Layer {layer.name!r}: ALQ supports channels_last Conv2D with "
                             "groups=1 only.")
    chosen_ids = {id(l) for l in chosen}
    first_id = id(chosen[0])

    def clone(layer):
        if id(layer) not in chosen_ids:
            return layer.__class__.from_config(layer.get_config())
        common = dict(
            name=layer.name, group=_group_for(layer, group), max_bits=max_bits,
            activation=keras.activations.serialize(layer.activation), use_bias=layer.use_bias,
            kernel_initializer="zeros",
            input_quantizer=None if activation_bits is None or id(layer) == first_id
            else ALQActivation(activation_bits, name=f"{layer.name}_input_quantizer"),
        )
        if isinstance(layer, keras.layers.Dense):
            return ALQDense(layer.units, **common)
        return ALQConv2D(layer.filters, layer.kernel_size, strides=layer.strides,
                         padding=layer.padding, dilation_rate=layer.dilation_rate, **common)

    new = keras.models.clone_model(model, clone_function=clone)
    for old, twin in zip(model.layers, new.layers):
        if id(old) in chosen_ids:
            twin.set_float_kernel(np.asarray(keras.ops.convert_to_numpy(old.kernel)), sigma)
            if old.use_bias:
                twin.bias.assign(keras.ops.copy(old.bias))
        elif old.weights:
            twin.set_weights(old.get_weights())
    return new
