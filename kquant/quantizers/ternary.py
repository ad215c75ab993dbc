"""Ternary weights: TWN and BitNet b1.58 (levels ``{−s, 0, +s}``, stored at 2 bits).

* TWN (Li, Zhang & Liu 2016, "Ternary Weight Networks"):
  ``Δ = 0.7·mean|W|``, ``α = mean(|W_i| : |W_i| > Δ)``,
  ``Q(W) = α·sign(W)·1{|W| > Δ}``.
* BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs"), absmean:
  ``γ = mean|W|``, ``Q(W) = γ·clip(round(W/(γ+ε)), −1, 1)``.

Both are a three-level staircase (levels ``−1, 0, 1``) on ``z = W/(2Δ)``
(TWN, decision boundaries ``±Δ``) or ``z = W/(γ+ε)`` (BitNet, ``±(γ+ε)/2``)
followed by the scale. Δ, α and γ are statistics of the tensor held constant
in the backward pass (as BWN's scale and the papers' STE), so the gradient is
``g_W = g·scale·F'(s)·dz/dW``: with ``estimator="ste"`` (the default) that is
``g·α/(2Δ)`` for TWN (the secant slope of its staircase; the paper's plain
``g`` differs by this positive per-tensor factor, which Adam ignores) and
``g·γ/(γ+ε)`` (≈ ``g``, the paper's STE) for BitNet. With ``per_channel`` the
statistics are taken per output channel (``channel_axes``, set by the layer).
Ties ``|z| = ½`` round up (``W = +Δ`` → ``+α``, ``W = −Δ`` → 0), a measure-zero
difference from the papers' strict ``>`` and ``round``.
"""

import keras
from keras import ops

from kquant.quantizers import channels
from kquant.quantizers.base import Quantizer
from kquant.quantizers.fused import masked_mean, mean_abs, scaled_staircase
from kquant.staircase import Staircase
from kquant.validation import check_bool, check_number
from kquant.xla import ynn_reduces

_TERNARY = Staircase(-1.0, 1.0)


class _Ternary(Quantizer):
    """Shared by TWN and BitNet: levels −1, 0, +1 times a per-tensor/per-channel scale."""

    default_estimator = "ste"

    def __init__(self, per_channel=False, channel_axes=None, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.per_channel = check_bool(per_channel, "per_channel")
        self.channel_axes = channels.check_channel_axes(channel_axes)
        if self.channel_axes is not None and not self.per_channel:
            raise ValueError(f"{type(self).__name__}: `channel_axes` applies only with "
                             "`per_channel=True`.")

    @property
    def precision(self):
        return 2

    @property
    def staircase(self):
        return _TERNARY

    def _axes(self, x):
        return channels.reduced_axes(len(x.shape), self.channel_axes) if self.per_channel else None

    def post(self, q, params):
        return q * params["scale"]

    def statistics(self, x, axes):
        """``(a, d)``: ``Q(x) = a·step(x/d)``, both held constant in the backward pass."""
        raise NotImplementedError

    def fused(self, x, slope, training=None):
        """Training calls: ``a·step(x/d)`` with ``(a, d) = statistics(x)`` computed in the
        forward half, ``∂ℓ/∂W = a·F'(s)·g/d`` (:func:`~kquant.quantizers.fused.scaled_staircase`).
        Inference takes ``pre``/``post``, as :meth:`encode` does."""
        # the class whose `statistics` runs must own `pre`/`post` too (a subclass
        # overriding `pre` alone gets the generic path)
        owner = next(c for c in type(self).__mro__ if "statistics" in vars(c))
        if training is not True or not self._fusable(owner):
            return None
        axes = self._axes(x)
        return scaled_staircase(x, slope, self.staircase, training,
                                stats=lambda v: self.statistics(v, axes))

    def extra_bits(self, shape):
        return 32 * (channels.channel_count(shape, self.channel_axes) if self.per_channel else 1)

    def get_config(self):
        config = {**super().get_config(), "per_channel": self.per_channel}
        if self.channel_axes is not None:
            config["channel_axes"] = list(self.channel_axes)
        return config


@keras.saving.register_keras_serializable(package="kquant")
class TWN(_Ternary):
    """TWN (Li et al. 2016): α·sign(W)·1{|W| > Δ}, Δ = 0.7·mean|W|, α = mean of |W| above Δ."""

    def __init__(self, threshold_factor=0.7, per_channel=False, channel_axes=None,
                 estimator=None, **kwargs):
        super().__init__(per_channel=per_channel, channel_axes=channel_axes,
                         estimator=estimator, **kwargs)
        self.threshold_factor = check_number(threshold_factor, "threshold_factor", gt=0)

    def pre(self, x, training=None):
        axes = self._axes(x)
        w = ops.stop_gradient(x)
        delta = self.threshold_factor * ops.mean(ops.abs(w), axis=axes, keepdims=True)
        delta = ops.maximum(delta, 1e-12)
        z = x * (1.0 / (2.0 * delta))   # as `scaled_staircase`: a product, not a quotient
        kept = ops.cast(ops.abs(self.staircase.hard(ops.stop_gradient(z))) > 0, w.dtype)
        count = ops.sum(kept, axis=axes, keepdims=True)
        alpha = ops.sum(ops.abs(w) * kept, axis=axes, keepdims=True) / ops.maximum(count, 1.0)
        return z, {"scale": alpha}

    def statistics(self, x, axes):
        d = 2.0 * ops.maximum(self.threshold_factor * mean_abs(x, axes), 1e-12)
        kept = ops.cast(ops.abs(self.staircase.hard(x * (1.0 / d))) > 0, x.dtype)
        # |x| as max(x, −x) under JAX's XLA:CPU: an op of its own, not one |x| that the
        # mean above also reads, which XLA would write out as a whole tensor
        magnitude = ops.maximum(x, -x) if ynn_reduces() else ops.abs(x)
        return masked_mean(magnitude, kept, axes), d

    def get_config(self):
        return {**super().get_config(), "threshold_factor": self.threshold_factor}


@keras.saving.register_keras_serializable(package="kquant")
class BitNet(_Ternary):
    """BitNet b1.58 absmean (Ma et al. 2024): γ·clip(round(W/(γ+ε)), −1, 1), γ = mean|W|."""

    def __init__(self, epsilon=1e-5, per_channel=False, channel_axes=None, estimator=None,
                 **kwargs):
        super().__init__(per_channel=per_channel, channel_axes=channel_axes,
                         estimator=estimator, **kwargs)
        self.epsilon = check_number(epsilon, "epsilon", gt=0)

    def pre(self, x, training=None):
        gamma = ops.stop_gradient(ops.mean(ops.abs(x), axis=self._axes(x), keepdims=True))
        return x * (1.0 / (gamma + self.epsilon)), {"scale": gamma}

    def statistics(self, x, axes):
        gamma = mean_abs(x, axes)
        return gamma, gamma + self.epsilon

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
