"""MetaQuant's view of a forward quantizer: ``W̃ = A(W)``, calibration, output slope.

MetaQuant (Chen et al. 2019, Eq. 1–4) writes a weight quantizer as
``Ŵ = Q(W̃)``, ``W̃ = A(W)``; the meta network maps ``(g_Ŵ, W̃)`` to
``g_W̃`` and ``g_W = g_W̃ · ∂W̃/∂W`` (the *calibration*):

* DoReFa: ``W̃ = tanh W / (2 max|tanh W|) + ½``, calibration
  ``(1 − tanh² W) / max|tanh W|`` (the paper's formula, which folds in the
  factor 2 of ``Ŵ = 2·round(…)/(2^k−1) − 1``), with ``max|tanh W|`` a
  constant as in the paper and the authors' code (no term through the max;
  kquant's DoReFa + STE keeps one, so the two differ at the arg-max only).
* BWN: ``W̃ = W``, calibration 1 (the scale ``mean|W|`` is a constant).
* Sign: ``W̃ = W``, calibration 1.

``output_slope`` is ``∂Ŵ/∂q`` for the staircase level ``q``; the trainer
reads ``g_q`` and divides by it to get ``g_Ŵ``.
"""

from __future__ import annotations

from keras import ops

from kquant.quantizers import BWN, DoReFa, Sign


class MetaView:
    """How MetaQuant sees one quantizer (see module docstring)."""

    def __init__(self, quantizer):
        self.quantizer = quantizer

    def soft(self, w):
        """``W̃ = A(W)``, the meta network's weight input."""
        return w

    def calibrate(self, w, g_soft):
        """``g_W`` from ``g_W̃``: the vector–Jacobian product through ``A``."""
        return g_soft

    def output_slope(self, w):
        """``∂Ŵ/∂q`` (a scalar or a broadcastable tensor)."""
        return 1.0


class DoReFaView(MetaView):
    def soft(self, w):
        t = ops.tanh(w)
        return t / (2.0 * ops.maximum(ops.max(ops.abs(t)), 1e-12)) + 0.5

    def calibrate(self, w, g_soft):
        # (1 − tanh² W) / max|tanh W|, the max held constant (paper Eq. 4, authors' code)
        t = ops.tanh(w)
        m = ops.maximum(ops.max(ops.abs(t)), 1e-12)
        return g_soft * (1.0 - t * t) / m

    def output_slope(self, w):
        return 2.0 / (2 ** self.quantizer.bits - 1)


class BWNView(MetaView):
    def output_slope(self, w):
        axes = tuple(range(len(w.shape) - 1)) if self.quantizer.per_channel else None
        return ops.maximum(ops.mean(ops.abs(w), axis=axes, keepdims=True), 1e-12)


def meta_view(quantizer) -> MetaView:
    """The :class:`MetaView` of a kernel quantizer; a clear error if unsupported."""
    if isinstance(quantizer, DoReFa):
        return DoReFaView(quantizer)
    if isinstance(quantizer, BWN):
        return BWNView(quantizer)
    if isinstance(quantizer, Sign):
        return MetaView(quantizer)
    raise ValueError(
        "MetaQuant estimators support the DoReFa, BWN and Sign kernel quantizers "
        f"(the paper's forward maps); got {type(quantizer).__name__}."
    )
