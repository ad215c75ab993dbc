"""A small ALQ convnet and a separable toy task shared by the ALQ test modules."""

import keras
import numpy as np

from kquant.alq import ALQActivation, ALQConv2D, ALQDense


def toy_data(n=64):
    rng = np.random.default_rng(0)
    x = rng.random((n, 6, 6, 2)).astype("float32")
    y = (x[:, :3].mean(axis=(1, 2, 3)) > x[:, 3:].mean(axis=(1, 2, 3))).astype("int32")
    return x, y


def toy_model():
    """ALQConv2D → ALQDense with a 2-bit ALQ activation quantizer; seeded initialisers."""
    inputs = keras.Input((6, 6, 2))
    h = ALQConv2D(4, 3, padding="same", activation="relu", max_bits=3,
                  kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
    h = keras.layers.Flatten()(h)
    out = ALQDense(2, max_bits=3, group=16, input_quantizer=ALQActivation(2),
                   kernel_initializer=keras.initializers.GlorotUniform(seed=2))(h)
    return keras.Model(inputs, out)
