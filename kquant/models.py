"""The reference papers' float models, built with plain Keras layers.

Quantize them with :func:`kquant.quantize_model`. All take
``input_shape`` and ``num_classes`` and end with logits (no softmax).

* ``chollet``: Chollet's MNIST convnet (Conv32-MP-Conv64-MP-Conv128-Dense),
  He-uniform init, as in "custom estimators are STEs in disguise".
* ``lenet5``: 20C5-MP2-50C5-MP2-500FC-10 (ALQ, MetaQuant).
* ``vgg_small``: 2×128C3-MP2-2×256C3-MP2-2×512C3-MP2-2×1024FC-10 (ALQ).
* ``resnet20``: CIFAR ResNet-20 (He et al. 2016; EWGS, MetaQuant).
* ``small_convnet``: a tiny convnet for the 8×8 digits and tests (BN momentum 0.9:
  its runs are a few hundred steps, too short for Keras' 0.99).
"""

from __future__ import annotations

import keras
from keras import layers


def _pool_if_room(x, size=2):
    """Max-pool unless the feature map is already smaller than the window."""
    h, w = x.shape[1], x.shape[2]
    if h is not None and (h < size or w < size):
        return x
    return layers.MaxPooling2D(size)(x)


def chollet(input_shape=(28, 28, 1), num_classes=10):
    init = "he_uniform"
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(32, 3, activation="relu", kernel_initializer=init)(inputs)
    x = _pool_if_room(x)
    x = layers.Conv2D(64, 3, activation="relu", kernel_initializer=init, padding="same")(x)
    x = _pool_if_room(x)
    x = layers.Conv2D(128, 3, activation="relu", kernel_initializer=init, padding="same")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(num_classes, kernel_initializer=init)(x)
    return keras.Model(inputs, outputs, name="chollet")


def lenet5(input_shape=(28, 28, 1), num_classes=10):
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(20, 5, padding="same" if input_shape[0] < 16 else "valid")(inputs)
    x = layers.ReLU()(_pool_if_room(x))
    x = layers.Conv2D(50, 5, padding="same" if input_shape[0] < 16 else "valid")(x)
    x = layers.ReLU()(_pool_if_room(x))
    x = layers.Flatten()(x)
    x = layers.Dense(500, activation="relu")(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="lenet5")


def vgg_small(input_shape=(32, 32, 3), num_classes=10, width=1.0):
    def c(n):
        return max(4, int(n * width))

    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (128, 256, 512):
        for _ in range(2):
            x = layers.Conv2D(c(filters), 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        x = _pool_if_room(x)
    x = layers.Flatten()(x)
    for _ in range(2):
        x = layers.Dense(c(1024), use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="vgg_small")


def resnet20(input_shape=(32, 32, 3), num_classes=10, width=16):
    def conv_bn(x, filters, strides=1, relu=True):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                          kernel_initializer="he_normal")(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, width)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(x, filters, strides)
            y = conv_bn(y, filters, relu=False)
            if strides != 1 or x.shape[-1] != filters:
                x = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x)
                x = layers.BatchNormalization()(x)
            x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="resnet20")


def small_convnet(input_shape=(8, 8, 1), num_classes=10, width=32):
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(2 * width, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(_pool_if_room(x))
    x = layers.Flatten()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="small_convnet")


MODELS = {
    "chollet": chollet,
    "lenet5": lenet5,
    "vgg_small": vgg_small,
    "resnet20": resnet20,
    "small_convnet": small_convnet,
}


def build(name, input_shape, num_classes=10, **kwargs):
    """Build a float model by name (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    return MODELS[name](tuple(input_shape), num_classes, **kwargs)
