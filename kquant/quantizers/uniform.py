"""Uniform k-bit quantizer with a fixed or learnable step.

``Q(x) = Δ·round(clip((x − m)/Δ, l, u)) + m`` ("custom estimators", Eq. 1),
symmetric ``l = −2^(b−1), u = 2^(b−1) − 1`` (``m = 0``) or asymmetric
``l = 0, u = 2^b − 1`` with offset ``m`` (``offset``, default 0: unsigned,
e.g. DoReFa activations with ``step=1/(2^b−1)``).

``step`` a float: fixed Δ. ``step=None``: Δ learned (per tensor, or per output
channel with ``per_channel=True``); gradients reach Δ through ``Δ·step(x/Δ)``
as in LSQ (Esser et al. 2020). It is initialised from the first batch it sees,
``Δ₀ = 2·mean|x|/√u``, stored as ``Δ = Δ₀·|c|`` with ``c`` trainable (1 at
start) so the data-driven part lives in a non-trainable variable.
"""

import math

from keras import ops

from kquant.quantizers.base import Quantizer, check_bits
from kquant.staircase import Staircase


class Uniform(Quantizer):
    """Uniform k-bit: Δ·round(clip(x/Δ, l, u)), symmetric or asymmetric, fixed or learnable Δ."""

    def __init__(self, bits=8, symmetric=True, step=None, per_channel=False,
                 offset=0.0, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.bits = check_bits(bits, "bits", 1, 16)
        self.symmetric = bool(symmetric)
        if step is not None:
            step = float(step)
            if not (step > 0 and math.isfinite(step)):
                raise ValueError(f"Uniform: `step` must be a positive finite float or None, got {step}.")
            if per_channel:
                raise ValueError("Uniform: `per_channel=True` needs a learnable step (`step=None`).")
        self.step = step
        self.per_channel = bool(per_channel)
        self.offset = float(offset)
        if self.symmetric and self.offset != 0.0:
            raise ValueError("Uniform: `offset` applies only with `symmetric=False`.")
        if self.symmetric and self.bits < 2:
            raise ValueError("Uniform: a symmetric quantizer needs `bits` >= 2 (use Sign for 1 bit).")

    @property
    def precision(self):
        return self.bits

    @property
    def staircase(self):
        if self.symmetric:
            return Staircase(float(-(2 ** (self.bits - 1))), float(2 ** (self.bits - 1) - 1))
        return Staircase(0.0, float(2**self.bits - 1))

    def build(self, input_shape):
        if self.step is None:
            shape = (input_shape[-1],) if self.per_channel else ()
            self.step_scale = self.add_weight(name="step_scale", shape=shape, initializer="ones")
            self.step_init = self.add_weight(
                name="step_init", shape=shape, initializer="ones", trainable=False,
                aggregation="only_first_replica",
            )
            self.initialized = self.add_weight(
                name="initialized", shape=(), initializer="zeros", trainable=False,
                aggregation="only_first_replica",
            )
        super().build(input_shape)

    def _step(self, x):
        if self.step is not None:
            return ops.cast(self.step, x.dtype)
        st = self.staircase
        u = max(st.hi, 1.0)  # LSQ: Q_P, the largest positive level
        axes = tuple(range(len(x.shape) - 1)) if self.per_channel else None
        estimate = 2.0 * ops.mean(ops.abs(ops.stop_gradient(x) - self.offset), axis=axes) / math.sqrt(u)
        estimate = ops.maximum(estimate, 1e-8)
        done = ops.convert_to_tensor(self.initialized) > 0
        base = ops.where(done, ops.convert_to_tensor(self.step_init), estimate)
        self.step_init.assign(base)
        self.initialized.assign(1.0)
        return base * ops.abs(self.step_scale)

    def extra_bits(self, shape):
        return 32 * (int(shape[-1]) if self.per_channel else 1)

    def pre(self, x, training=None):
        step = self._step(x)
        return (x - self.offset) / step, {"step": step}

    def post(self, q, params):
        return q * params["step"] + self.offset

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "step": self.step,
            "per_channel": self.per_channel,
            "offset": self.offset,
        }
