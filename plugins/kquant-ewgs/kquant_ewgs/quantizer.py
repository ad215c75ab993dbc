"""The EWGS quantizer: a uniform quantizer on a learnable interval ``[l, u]``.

Lee, Kim & Ham, CVPR 2021, Eqs. 1–3::

    x_n = clip((x − l)/(u − l), 0, 1)
    x_q = round((2^b − 1)·x_n)/(2^b − 1)
    Q_W(x) = 2(x_q − ½)   (weights)      Q_A(x) = x_q   (activations)

In kquant's terms ``pre`` gives the staircase coordinate ``z = (2^b−1)·x_n``
(levels ``0..2^b−1``) and ``post`` maps the level ``q`` back. ``l`` and ``u``
are trainable and receive gradients through the normalisation (zero where the
clip is active, as in the authors' code). They are initialised from the first
batch seen (paper §4.1): weights ``l, u = ∓3σ(W)``; activations ``l = 0``,
``u = 3σ(a)/√(1 − 2/π)`` (half-wave Gaussian). The per-layer output scale α
of the paper lives in the layer: see :mod:`kquant_ewgs.layers`.
"""

from __future__ import annotations

import math

from keras import ops

from kquant.quantizers.base import Quantizer, check_bits
from kquant.staircase import Staircase
from kquant_ewgs._state import add_state, init_once

_KINDS = ("weight", "activation")
_EPS = 1e-8


class EWGSQuantizer(Quantizer):
    """EWGS learnable-interval b-bit: x_n = clip((x−l)/(u−l),0,1), weights 2(x_q−½), activations x_q."""

    default_estimator = "ewgs"

    def __init__(self, bits=2, kind="weight", lr_multiplier=1.0, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        self.bits = check_bits(bits, "bits", 1, 16)
        lr_multiplier = float(lr_multiplier)
        if not (lr_multiplier > 0 and math.isfinite(lr_multiplier)):
            raise ValueError(f"EWGSQuantizer: `lr_multiplier` must be a positive float, got {lr_multiplier}.")
        # l = l₀ + m·Δl: with Adam, l then moves at m × the learning rate (the paper
        # trains l, u, α with lr 1e-5, far below the weights' lr).
        self.lr_multiplier = lr_multiplier
        if kind not in _KINDS:
            raise ValueError(f"EWGSQuantizer: `kind` must be one of {_KINDS}, got {kind!r}.")
        self.kind = kind

    @property
    def precision(self):
        return self.bits

    @property
    def levels(self) -> int:
        """``2^b − 1``: the number of steps of the staircase."""
        return 2**self.bits - 1

    @property
    def staircase(self):
        return Staircase(0.0, float(self.levels))

    def build(self, input_shape):
        # l = l₀ + Δl: the data-driven l₀ is a step statistic (set by the optimizer's
        # apply from the first finite training step it takes: kquant_ewgs._state), the
        # trainable Δl starts at 0, so ∂ℓ/∂Δl = ∂ℓ/∂l exactly. Created in the saved
        # layout of files written when l₀ was non-trainable (offsets first): they still load.
        self.lower_offset = self.add_weight(name="lower_offset", shape=(), initializer="zeros")
        self.upper_offset = self.add_weight(name="upper_offset", shape=(), initializer="zeros")
        self.lower_init, self.upper_init = add_state(self, "lower_init"), add_state(self, "upper_init")
        self.initialized = add_state(self, "initialized")
        super().build(input_shape)

    def _initial_interval(self, moments):
        """Paper §4.1: ``∓3σ(W)`` (weights); ``0, 3σ(a)/√(1−2/π)`` (activations), from the
        global batch's moments ``E[x], E[x²]`` (all-reduced across replicas)."""
        m1, m2 = moments
        sigma = ops.sqrt(ops.maximum(m2 - ops.square(m1), 0.0))
        if self.kind == "weight":
            return -3.0 * sigma, 3.0 * sigma
        return ops.zeros_like(sigma), 3.0 * sigma / math.sqrt(1.0 - 2.0 / math.pi)

    def interval(self, x, training=None):
        """``(l, u)`` as tensors and the commit of ``l₀, u₀`` (:func:`init_once`). They are
        stored from the first finite batch of a training step the optimizer applies; before
        that every call uses its own data's estimate."""
        def moments():
            v = ops.cast(ops.stop_gradient(x), "float32")
            return [ops.mean(v), ops.mean(ops.square(v))]

        def finish(moments):
            l0, u0 = self._initial_interval(moments)
            return [l0, ops.maximum(u0, l0 + 1e-3)]  # a constant tensor has σ = 0

        (l0, u0), commit = init_once([self.lower_init, self.upper_init], moments, 2, finish,
                                     self.initialized, training)
        m = self.lr_multiplier
        l0, u0 = ops.cast(l0, x.dtype), ops.cast(u0, x.dtype)
        return (l0 + m * ops.cast(self.lower_offset, x.dtype),
                u0 + m * ops.cast(self.upper_offset, x.dtype)), commit

    def bounds(self):
        """The current ``(l, u)`` as floats."""
        m = self.lr_multiplier
        lo = ops.convert_to_numpy(self.lower_init) + m * ops.convert_to_numpy(self.lower_offset)
        hi = ops.convert_to_numpy(self.upper_init) + m * ops.convert_to_numpy(self.upper_offset)
        return float(lo), float(hi)

    def pre(self, x, training=None):
        (lower, upper), commit = self.interval(x, training=training)
        x_n = ops.clip((x - lower) / ops.maximum(upper - lower, _EPS), 0.0, 1.0)
        return commit(self.levels * x_n), {}

    def post(self, q, params):
        x_q = q / self.levels
        return 2.0 * (x_q - 0.5) if self.kind == "weight" else x_q

    def extra_bits(self, shape):
        # Weights deploy as levels only; activations need l and u at inference.
        return 0 if self.kind == "weight" else 64

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "kind": self.kind,
                "lr_multiplier": self.lr_multiplier}
