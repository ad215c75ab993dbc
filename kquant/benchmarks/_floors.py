"""Cost floors for the overhead benchmark: the least element-wise work a kernel
quantizer adds to a layer's train step, timed as if it were one.

Not quantizers (nothing is rounded): each maps the latent kernel ``W`` through
the passes every quantizer of a family must make, written as the quantizers are
(one custom-gradient function whose halves are XLA-compiled where the step is
not, :func:`kquant.quantizers.fused.with_parameter`), so a quantizer's row can
be read against the floor of its formula:

* ``pass``: ``Ŵ = s·W``, ``∂ℓ/∂W = s·g``: one pass over the kernel each way,
  what sign, BWN, TWN and BitNet (one pass forward, a slope backward) cannot
  go below;
* ``tanh``: ``Ŵ = s·tanh W``, ``∂ℓ/∂W = s·(1 − tanh²W)·g``: the transcendental
  that DoReFa (``tanh W`` in both halves) and HTGE (``tanh`` in its slope)
  evaluate over every weight each step.

``s`` is a non-trainable 1 read at run time, so no compiler folds the map away.
"""

from __future__ import annotations

from keras import ops

from kquant.quantizers.base import Quantizer
from kquant.quantizers.fused import with_parameter

KINDS = ("pass", "tanh")


class CostFloor(Quantizer):
    """``s·W`` (``kind="pass"``) or ``s·tanh W`` (``kind="tanh"``) with its exact
    gradient: a floor to time, not a quantizer (``precision`` 32)."""

    def __init__(self, kind="pass", **kwargs):
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"CostFloor: `kind` must be one of {KINDS}, got {kind!r}.")
        self.kind = kind

    @property
    def precision(self):
        return 32

    def build(self, input_shape):
        self.s = self.add_weight(name="s", shape=(), initializer="ones", trainable=False)
        super().build(input_shape)

    def call(self, x, training=None):
        x = ops.cast(x, "float32")
        tanh = self.kind == "tanh"

        def forward(x, s):
            return s * (ops.tanh(x) if tanh else x)

        def backward(g, x, s):
            if tanh:
                t = ops.tanh(x)
                g = g * (1.0 - t * t)
            return g * s, ops.zeros_like(s)

        return with_parameter(forward, backward, x, self.s, training)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}
