"""Binary quantizers: sign and BWN (scaled sign).

* sign: ``Q(x) = +1 if x ≥ 0 else −1`` (Courbariaux et al. 2016).
* BWN (Rastegari et al. 2016, XNOR-Net): ``Q(W) = mean(|W|)·sign(W)``, the
  mean over the whole tensor or per output channel (``channel_axes``, set by
  the layer from its kernel layout; default the last axis), treated as a
  constant in the backward pass (as in Larq's MagnitudeAwareSign and
  MetaQuant's code).
"""

from keras import ops

from kquant.quantizers import channels
from kquant.quantizers.base import Quantizer
from kquant.quantizers.fused import mean_abs, scaled_staircase
from kquant.staircase import Staircase
from kquant.validation import check_bool

_SIGN = Staircase.sign()


class Sign(Quantizer):
    """sign(x) ∈ {−1, +1}, sign(0) = +1 (1 bit)."""

    default_estimator = "clipped_ste"

    @property
    def precision(self):
        return 1

    @property
    def staircase(self):
        return _SIGN

    def pre(self, x, training=None):
        return x, {}

    def post(self, q, params):
        return q

    def fused(self, x, slope, training=None):
        """``sign(x)`` with ``∂ℓ/∂x = F'(x)·g`` in one custom-gradient function."""
        if not self._fusable(Sign):
            return None
        return scaled_staircase(x, slope, _SIGN, training)


class BWN(Quantizer):
    """BWN scaled sign: mean(|W|)·sign(W), per tensor or per output channel (1 bit + scales)."""

    default_estimator = "clipped_ste"

    def __init__(self, per_channel=False, channel_axes=None, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.per_channel = check_bool(per_channel, "per_channel")
        self.channel_axes = channels.check_channel_axes(channel_axes)
        if self.channel_axes is not None and not self.per_channel:
            raise ValueError("BWN: `channel_axes` applies only with `per_channel=True`.")

    @property
    def precision(self):
        return 1

    @property
    def staircase(self):
        return _SIGN

    def _axes(self, x):
        return channels.reduced_axes(len(x.shape), self.channel_axes) if self.per_channel else None

    def pre(self, x, training=None):
        scale = ops.mean(ops.abs(x), axis=self._axes(x), keepdims=True)
        return x, {"scale": ops.stop_gradient(scale)}

    def post(self, q, params):
        return q * params["scale"]

    def fused(self, x, slope, training=None):
        """Training calls: ``a·sign(W)``, ``a = mean|W|`` held constant (computed in the
        forward half): ``∂ℓ/∂W = a·F'(W)·g``. Inference takes ``pre``/``post``, as
        :meth:`encode` does."""
        if training is not True or not self._fusable(BWN):
            return None
        axes = self._axes(x)
        return scaled_staircase(x, slope, _SIGN, training,
                                stats=lambda v: (mean_abs(v, axes), None))

    def extra_bits(self, shape):
        return 32 * (channels.channel_count(shape, self.channel_axes) if self.per_channel else 1)

    def get_config(self):
        config = {**super().get_config(), "per_channel": self.per_channel}
        if self.channel_axes is not None:  # absent: configs saved before it existed still load
            config["channel_axes"] = list(self.channel_axes)
        return config

