"""End to end on the embedded 8×8 digits: float convnet → ALQ pipeline → ≤ 1.0 average bit."""

import keras
import numpy as np
import pytest
from keras import layers

from kquant import datasets
from kquant.alq import average_bitwidth, alq_layers, fit_pipeline, quantize

MARGIN = 0.06  # stated margin: ALQ accuracy ≥ float accuracy − 6 points at ≤ 1 bit


@pytest.mark.slow
def test_digits_float_to_sub_one_bit_keeps_accuracy():
    keras.utils.set_random_seed(0)
    (x, y), (xt, yt) = datasets.load("digits")
    float_model = keras.Sequential([  # BN-free: BN moving statistics lag behind pruning
        keras.Input(x.shape[1:]),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.Flatten(),
        layers.Dense(10)])
    float_model.compile(keras.optimizers.Adam(3e-3),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"])
    float_model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    float_acc = float_model.evaluate(xt, yt, verbose=0)[1]

    # LeNet-style groups as the authors' code: kernel-wise convs, channel-wise dense.
    alq_model = quantize(float_model, max_bits=4,
                         group=lambda l: "kernel" if isinstance(l, layers.Conv2D) else "channel")
    start_bits = average_bitwidth(alq_layers(alq_model))
    _, schedule = fit_pipeline(alq_model, x, y, batch_size=64, rounds=2, prune_epochs=1,
                               bases_epochs=2, coordinates_epochs=2, bases_lr=1e-3,
                               coordinates_lr=1e-3, ratio=0.5, target_bits=1.0, verbose=0)
    alq_acc = alq_model.evaluate(xt, yt, verbose=0)[1]
    bits = average_bitwidth(alq_layers(alq_model))
    print(f"\nfloat accuracy {float_acc:.4f}; ALQ {bits:.3f} bits (from {start_bits:.2f}) "
          f"accuracy {alq_acc:.4f}")
    assert bits <= 1.0
    assert [r["phase"] for r in schedule.log] == ["prune", "bases", "bases", "coordinates",
                                                  "coordinates"] * 2
    assert alq_acc >= float_acc - MARGIN
    assert np.isfinite(alq_model.predict(xt[:8], verbose=0)).all()
