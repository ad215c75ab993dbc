"""Uniform k-bit quantizer with a fixed or learnable step.

``Q(x) = Δ·round(clip((x − m)/Δ, l, u)) + m`` ("custom estimators", Eq. 1),
symmetric ``l = −2^(b−1), u = 2^(b−1) − 1`` (``m = 0``) or asymmetric
``l = 0, u = 2^b − 1`` with offset ``m`` (``offset``, default 0: unsigned,
e.g. DoReFa activations with ``step=1/(2^b−1)``).

``step`` a float: fixed Δ. ``step=None``: Δ learned (per tensor, or per output
channel with ``per_channel=True``); gradients reach Δ through ``Δ·step(x/Δ)``
as in LSQ (Esser et al. 2020). It is initialised from the first finite
*training* step the optimizer applies, ``Δ₀ = 2·mean|x|/√Q_P`` (``Q_P = u``,
the largest positive level), the mean taken over the global batch on every
replica (:func:`kquant.distribute.global_mean`); inference calls, NaN/inf
and all-zero batches and steps the optimizer skips never initialise it (until
then Δ₀ is that batch's estimate, not stored); per channel, a channel that is
all zero takes the mean over channels. It is stored as ``Δ = Δ₀·|c|`` with
``c`` trainable (1 at start); Δ₀ is a step statistic that the optimizer
writes (:func:`kquant.step_state.initialize_once`).

LSQ gradient scale (``lsq_grad_scale=True``, Esser et al. 2020, §2.2): the
step's gradient is multiplied by ``g = 1/√(N·Q_P)``, ``N`` the number of
values sharing one step (the kernel's size, or one example's features for
activations; per channel: divided by the number of channels). The forward
value is unchanged (``c`` enters as ``sg(c) + (g·c − sg(g·c))``).
"""

import math

from keras import ops

from kquant import distribute, step_state
from kquant.quantizers import channels
from kquant.quantizers.base import Quantizer, apply_slope, check_bits, sum_to
from kquant.quantizers.fused import with_parameter
from kquant.reductions import written_once
from kquant.staircase import Staircase
from kquant.validation import check_bool, check_number


class Uniform(Quantizer):
    """Uniform k-bit: Δ·round(clip(x/Δ, l, u)), symmetric or asymmetric, fixed or learnable Δ."""

    def __init__(self, bits=8, symmetric=True, step=None, per_channel=False,
                 offset=0.0, channel_axes=None, lsq_grad_scale=True, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.lsq_grad_scale = check_bool(lsq_grad_scale, "lsq_grad_scale")
        self.bits = check_bits(bits, "bits", 1, 16)
        self.symmetric = check_bool(symmetric, "symmetric")
        if step is not None:
            step = check_number(step, "step", gt=0)
            if per_channel:
                raise ValueError("Uniform: `per_channel=True` needs a learnable step (`step=None`).")
        self.step = step
        self.per_channel = check_bool(per_channel, "per_channel")
        # the channel axes of the quantized tensor (None: last); layers set them at build
        self.channel_axes = channels.check_channel_axes(channel_axes)
        if self.channel_axes is not None and not self.per_channel:
            raise ValueError("Uniform: `channel_axes` applies only with `per_channel=True`.")
        self.offset = check_number(offset, "offset")
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
            shape = channels.channel_shape(input_shape, self.channel_axes) if self.per_channel else ()
            self.step_scale = self.add_weight(name="step_scale", shape=shape, initializer="ones",
                                              autocast=False)
            # set once from a global statistic by the optimizer's step (kquant.step_state)
            self.step_init = step_state.add_statistic(self, "step_init", shape, "ones")
            self.initialized = step_state.add_statistic(self, "initialized", (), "zeros")
            # LSQ's N: values per step (the batch axis, when unknown, is not counted)
            size = math.prod(int(d) for d in input_shape if d is not None)
            channels_count = math.prod(shape) if shape else 1
            self._values_per_step = max(size // max(channels_count, 1), 1)
        super().build(input_shape)

    @property
    def lsq_gradient_scale(self) -> float:
        """LSQ's ``g = 1/√(N·Q_P)`` (1 when ``lsq_grad_scale=False``)."""
        if not self.lsq_grad_scale:
            return 1.0
        return 1.0 / math.sqrt(self._values_per_step * max(self.staircase.hi, 1.0))

    def _step(self, x, training=None):
        if self.step is not None:
            return ops.cast(self.step, x.dtype)
        u = max(self.staircase.hi, 1.0)  # LSQ: Q_P, the largest positive level
        axes = channels.reduced_axes(len(x.shape), self.channel_axes) if self.per_channel else None
        # estimated only until Δ₀ is stored; afterwards no pass over x (`skip`)
        mean_abs = distribute.global_mean(
            ops.stop_gradient(x), axis=axes, map=lambda v: ops.abs(v - self.offset),
            skip=step_state.is_initialized(self.initialized))
        if self.per_channel:  # a channel without signal (e.g. a dead pixel) takes the tensor's mean
            mean_abs = ops.where(mean_abs > 0, mean_abs, ops.mean(mean_abs))
        estimate = 2.0 * mean_abs / math.sqrt(u)
        # an all-zero batch (e.g. a dummy pass on zeros) carries no scale: wait for data
        (base,), commit = step_state.initialize_once(
            self.initialized, [(self.step_init, estimate)], training=training,
            valid=ops.all(mean_abs > 0))
        base = commit(ops.maximum(base, 1e-8))
        scale = ops.convert_to_tensor(self.step_scale)
        g = self.lsq_gradient_scale
        if g != 1.0:  # gradient × g, value exactly c
            scale = ops.stop_gradient(scale) + (scale * g - ops.stop_gradient(scale * g))
        step = base * ops.abs(scale)
        if self.per_channel:  # one step per channel, broadcast against x
            step = ops.reshape(step, channels.broadcast_shape(
                [1 if d is None else d for d in x.shape], self.channel_axes))
        return step

    def extra_bits(self, shape):
        return 32 * (channels.channel_count(shape, self.channel_axes) if self.per_channel else 1)

    def pre(self, x, training=None):
        step = self._step(x, training)
        return (x - self.offset) * (1.0 / step), {"step": step}   # as `fused`

    def post(self, q, params):
        return q * params["step"] + self.offset

    def fused(self, x, slope, training=None):
        """Value and gradient in one custom-gradient function: ``z = (x − m)/Δ``,
        ``q = ⌊clip(z)⌉``, ``g_z = F'(s)·Δ·g``::

            ∂ℓ/∂x = g_z/Δ = F'(s)·g,   ∂ℓ/∂Δ = Σ (g·q − g_z·z/Δ) = Σ g·(q − F'(s)·z)

        (summed over what shares Δ).

        Quotients by Δ are taken as products with ``1/Δ`` (here and in ``pre``): XLA
        recomputes a product in each loop that reads it instead of storing it
        (:func:`~kquant.quantizers.fused.scaled_staircase`). ``F'(s)·g`` is written once
        for the sum and ``∂ℓ/∂x``; evaluating it in each (HTGE's ``tanh`` twice, two
        fewer passes) measured alike (Dense 2048 HTGE, TensorFlow XLA 1.34/1.33× →
        1.39/1.33×, JAX CPU 1.49/1.36/1.39× → 1.41/1.33/1.41×, one process each)."""
        if not self._fusable(Uniform) or type(self)._step is not Uniform._step:
            return None
        step = self._step(x, training)
        st, offset = self.staircase, self.offset

        def levels(x, step):
            z = (x - offset if offset else x) * (1.0 / step)
            return z, st.hard(z)

        def forward(x, step):
            _, q = levels(x, step)
            return q * step + offset if offset else q * step

        def backward(g, x, step):  # z, q recomputed: one fused pass instead of saved tensors
            z, q = levels(x, step)
            g_s = apply_slope(g, slope, lambda: st.distance(z))   # F'(s)·g = g_z/Δ
            terms = g * q - g_s * z
            if len(step.shape) == 0:   # Dense 2048 HTGE on JAX's CPU: 1.68 → 1.38× float
                terms = written_once(terms)   # (benchmarks/results/jax_cpu/forms_ab.md)
            g_step = sum_to(terms, step)
            # never true (nothing exceeds +inf; NaN neither): x's gradient now reads Σ's
            # result, so XLA runs the in-place kernel update after the Σ that reads the
            # kernel instead of copying the kernel first (one pass over it less)
            return g_s * ops.where(g_step > float("inf"), 0.0, 1.0), g_step

        return with_parameter(forward, backward, x, step, training)

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "symmetric": self.symmetric,
            "step": self.step,
            "per_channel": self.per_channel,
            "offset": self.offset,
            "lsq_grad_scale": self.lsq_grad_scale,
            **({"channel_axes": list(self.channel_axes)} if self.channel_axes is not None else {}),
        }
