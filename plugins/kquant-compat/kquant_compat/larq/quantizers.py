"""Larq's quantizers (``larq.quantizers``) on kquant, with Larq's arguments and gradients.

* ``ste_sign`` — ``sign(x)``, ``g·1{|x| ≤ clip_value}`` (Hubara et al. 2016).
* ``approx_sign`` — ``sign(x)``, ``g·(2 − 2|x|)·1{|x| ≤ 1}`` (Liu et al. 2018, Bi-Real Net).
* ``swish_sign`` — ``sign(x)``, ``g·β(2 − βx·tanh(βx/2))/(1 + cosh βx)`` (Darabi et al. 2018).
* ``magnitude_aware_sign`` — ``stop_grad(mean|x|)·ste_sign(x)``, the mean per
  output channel (all axes but the last) (Liu et al. 2018, Bi-Real Net).
* ``ste_tern`` — ``sign(sign(x + t) + sign(x − t))`` ∈ {−1, 0, 1}, ``t = threshold_value`` or
  with ``ternary_weight_networks=True`` ``t = 0.7·mean|x|`` (Li et al. 2016);
  ``g·1{|x| ≤ clip_value}``.
* ``dorefa_quantizer`` — DoReFa (Zhou et al. 2016) ``k_bit`` quantizer; ``mode="activations"``:
  ``round(clip(x, 0, 1)·n)/n``, ``g·1{0 ≤ x ≤ 1}``; ``mode="weights"``:
  ``2·round(n·(tanh x/(2 max|tanh x|) + ½))/n − 1`` with the identity gradient through the
  rounding (so through ``tanh`` and the max), ``n = 2^k − 1``.

``sign(0) = +1`` as in Larq. Rounding ties go up (Larq's ``tf.round`` rounds half to
even), and ``ste_tern`` maps ``x = −t`` to 0 (Larq: −1): measure-zero differences.
"""

from __future__ import annotations

import keras
from keras import ops

from kquant.quantizers import check_bits
from kquant.staircase import Staircase
from kquant.validation import check_bool, check_choice, check_number
from kquant_compat.base import CompatQuantizer

_SIGN = Staircase.sign()
_TERNARY = Staircase(-1.0, 1.0)


def _clip_value(value):
    return None if value is None else check_number(value, "clip_value", gt=0)


def _inside(x, clip_value):
    if clip_value is None:
        return ops.ones_like(x)
    return ops.cast(ops.abs(x) <= clip_value, x.dtype)


class _LarqSign(CompatQuantizer):
    library = "Larq"

    @property
    def precision(self):
        return 1

    @property
    def staircase(self):
        return _SIGN

    def level_map(self, x):
        return x, {}

    def value_map(self, q, params):
        return q


@keras.saving.register_keras_serializable(package="kquant_compat")
class SteSign(_LarqSign):
    """Larq ste_sign: sign(x) forward, g·1{|x| ≤ clip_value} backward (clip_value=None: g)."""

    def __init__(self, clip_value=1.0, **kwargs):
        super().__init__(**kwargs)
        self.clip_value = _clip_value(clip_value)

    def derivative(self, x):
        return _inside(x, self.clip_value)

    def get_config(self):
        return {**super().get_config(), "clip_value": self.clip_value}


@keras.saving.register_keras_serializable(package="kquant_compat")
class ApproxSign(_LarqSign):
    """Larq approx_sign (Bi-Real Net): sign(x) forward, g·(2 − 2|x|)·1{|x| ≤ 1} backward."""

    def derivative(self, x):
        return ops.maximum(2.0 - 2.0 * ops.abs(x), 0.0)


@keras.saving.register_keras_serializable(package="kquant_compat")
class SwishSign(_LarqSign):
    """Larq swish_sign (BNN+): sign(x) forward, g·β(2 − βx·tanh(βx/2))/(1 + cosh βx) backward."""

    def __init__(self, beta=5.0, **kwargs):
        super().__init__(**kwargs)
        self.beta = check_number(beta, "beta", gt=0)

    def derivative(self, x):
        bx = self.beta * x
        return self.beta * (2.0 - bx * ops.tanh(bx / 2.0)) / (1.0 + ops.cosh(bx))

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


@keras.saving.register_keras_serializable(package="kquant_compat")
class MagnitudeAwareSign(SteSign):
    """Larq magnitude_aware_sign: stop_grad(mean|x| per output channel)·ste_sign(x)."""

    def level_map(self, x):
        axes = tuple(range(len(x.shape) - 1))
        scale = ops.mean(ops.abs(x), axis=axes, keepdims=True) if axes else ops.abs(x)
        return x, {"scale": ops.stop_gradient(scale)}

    def value_map(self, q, params):
        return q * params["scale"]

    def derivative(self, x):
        return self.level_map(x)[1]["scale"] * _inside(x, self.clip_value)

    def extra_bits(self, shape):
        return 32 * int(shape[-1])


@keras.saving.register_keras_serializable(package="kquant_compat")
class SteTern(CompatQuantizer):
    """Larq ste_tern: {−1, 0, 1} with threshold t (or TWN's 0.7·mean|x|), g·1{|x| ≤ clip_value}."""

    library = "Larq"

    def __init__(self, threshold_value=0.05, ternary_weight_networks=False, clip_value=1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.threshold_value = check_number(threshold_value, "threshold_value", gt=0)
        self.ternary_weight_networks = check_bool(ternary_weight_networks,
                                                  "ternary_weight_networks")
        self.clip_value = _clip_value(clip_value)

    @property
    def precision(self):
        return 2

    @property
    def staircase(self):
        return _TERNARY

    def level_map(self, x):
        if self.ternary_weight_networks:
            t = ops.maximum(0.7 * ops.mean(ops.abs(x)), 1e-12)
        else:
            t = ops.cast(self.threshold_value, x.dtype)
        return x / (2.0 * t), {}

    def value_map(self, q, params):
        return q

    def derivative(self, x):
        return _inside(x, self.clip_value)

    def get_config(self):
        return {**super().get_config(), "threshold_value": self.threshold_value,
                "ternary_weight_networks": self.ternary_weight_networks,
                "clip_value": self.clip_value}


@keras.saving.register_keras_serializable(package="kquant_compat")
class DoReFa(CompatQuantizer):
    """Larq dorefa_quantizer: k_bit DoReFa of activations (clip to [0, 1]) or weights (tanh)."""

    library = "Larq"

    def __init__(self, k_bit=2, mode="activations", **kwargs):
        super().__init__(**kwargs)
        self.k_bit = check_bits(k_bit, "k_bit", 1, 16)
        self.mode = check_choice(mode, "mode", ("activations", "weights"))

    @property
    def precision(self):
        return self.k_bit

    @property
    def staircase(self):
        return Staircase(0.0, float(2**self.k_bit - 1))

    @property
    def through_levels(self):
        # weights: Larq's identity gradient through the rounding, then tanh and the max
        return self.mode == "weights"

    def level_map(self, x):
        n = float(2**self.k_bit - 1)
        if self.mode == "weights":
            t = ops.tanh(x)
            return n * (t / (2.0 * ops.maximum(ops.max(ops.abs(t)), 1e-12)) + 0.5), {}
        return x * n, {}

    def value_map(self, q, params):
        n = float(2**self.k_bit - 1)
        return 2.0 * q / n - 1.0 if self.mode == "weights" else q / n

    def derivative(self, x):
        return ops.cast((x >= 0) & (x <= 1), x.dtype)

    def get_config(self):
        return {**super().get_config(), "k_bit": self.k_bit, "mode": self.mode}


DoReFaQuantizer = DoReFa

__all__ = ["ApproxSign", "DoReFa", "DoReFaQuantizer", "MagnitudeAwareSign", "SteSign", "SteTern",
           "SwishSign"]
