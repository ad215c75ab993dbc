"""The quantizer: a forward map and its gradient estimator.

``Q(x) = post(step(pre(x)))`` where ``step`` is a :class:`~kquant.staircase.Staircase`
whose backward pass belongs to the :class:`~kquant.estimators.Estimator`.
A quantizer is a small Keras layer carrying its ``precision`` (bits), so it
owns variables (learnable steps, estimator state) that save with the model,
and it can :meth:`encode` its output into integer codes plus a few floats
that :meth:`decode` turns back into exactly the same values.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kquant import estimators


def check_bits(bits, argument="bits", low=1, high=16) -> int:
    """Validate a bit width; the error names the argument."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"`{argument}` must be an integer in [{low}, {high}], got {bits!r}.")
    if not low <= int(bits) <= high:
        raise ValueError(f"`{argument}` must be an integer in [{low}, {high}], got {bits}.")
    return int(bits)


class Quantizer(keras.layers.Layer):
    """Base class: ``pre`` to staircase units, estimator-owned step, ``post`` back."""

    default_estimator = "ste"

    def __init__(self, estimator=None, **kwargs):
        super().__init__(**kwargs)
        self.estimator = estimators.get(estimator if estimator is not None else self.default_estimator)

    # -- what subclasses define ----------------------------------------------
    @property
    def precision(self) -> int:
        """Bits per quantized value."""
        raise NotImplementedError

    @property
    def staircase(self):
        raise NotImplementedError

    def pre(self, x, training=None):
        """``(z, params)``: staircase coordinate and the tensors ``post`` needs."""
        raise NotImplementedError

    def post(self, q, params):
        raise NotImplementedError

    def extra_bits(self, shape) -> int:
        """Bits of float parameters stored beside the codes (scales, steps) for ``shape``."""
        return 0

    # -- Keras layer -----------------------------------------------------------
    def build(self, input_shape):
        if not self.estimator.built:
            self.estimator.build(input_shape)
        self.built = True

    def call(self, x, training=None):
        z, params = self.pre(x, training=training)
        q = self.estimator.step(z, self.staircase, x=x, training=training)
        return self.post(q, params)

    def compute_output_shape(self, input_shape):
        return input_shape

    # -- deployment ----------------------------------------------------------
    def encode(self, x):
        """Inference-time ``(codes, params)``: level indices ``0..2^bits−1`` and floats."""
        x = ops.convert_to_tensor(x)
        z, params = self.pre(x, training=False)
        codes = self.staircase.to_level_index(self.staircase.hard(z))
        return ops.convert_to_numpy(codes), {k: ops.convert_to_numpy(v) for k, v in params.items()}

    def decode(self, codes, params):
        """The exact quantized values for ``encode``'s output."""
        st = self.staircase
        codes = ops.convert_to_tensor(np.asarray(codes), "float32")
        q = 2.0 * codes - 1.0 if st.binary else codes + st.lo
        return self.post(q, {k: ops.convert_to_tensor(v) for k, v in params.items()})

    # -- serialization ---------------------------------------------------------
    def get_config(self):
        return {"name": self.name, "estimator": estimators.serialize(self.estimator)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
