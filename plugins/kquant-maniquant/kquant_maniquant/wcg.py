"""ManiQuant's weak-curvature gradient (WCG), an O(n) whole-tensor estimator.

ManiQuant ("Riemannian STE", Eq. 15–16 and Appendix E): per layer, with
``t = vec(tanh(W))`` and ``P = t tᵀ`` (so ``tr(P) = ‖t‖²``)::

    g_W = (I + χ/tr(P) · P) · g_Ŵ ∘ 1{|W| ≤ 1},    χ = 1/out_channels

``P g = t (tᵀg)``, so the product costs two length-n reductions and an axpy:
O(n) time and memory, never an n×n matrix (:func:`weak_curvature_gradient`).
The gradient goes straight from the quantized weights ``Ŵ`` to the latent
``W`` (an STE with the metric folded in), not through the forward quantizer's
``pre`` map. kquant's estimators see ``g_q = ∂ℓ/∂q`` of the staircase level
``q``; WCG reads it on the ``[−1, 1]`` scale the paper's quantizers use
(``sign``, DoReFa): ``g_Ŵ = g_q·(hi − lo)/2``, which is exact for ``sign`` and
DoReFa and, for scaled binary quantizers (BWN), the usual convention of
clipped STE (the detached scale stays in the gradient). The paper keeps the
latent weights in ``[−1, 1]``: use :class:`UnitClip` as the kernel constraint.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from kquant.estimators.base import Estimator


def weak_curvature_gradient(g, w, chi, eps=1e-12):
    """``(g + χ/‖t‖² · t (tᵀg)) ∘ 1{|w| ≤ 1}``, ``t = tanh(w)``, over the whole tensor; O(n)."""
    t = ops.tanh(w)
    tg = ops.sum(t * g)                     # tᵀg, a scalar
    tt = ops.maximum(ops.sum(t * t), eps)   # tr(P) = ‖t‖²
    direction = g + (chi * tg / tt) * t
    return direction * ops.cast(ops.abs(w) <= 1.0, g.dtype)


class WCG(Estimator):
    """ManiQuant WCG: g_W = (g + χ/‖t‖²·t(tᵀg))∘1{|W|≤1}, t = tanh(W); χ = 1/out_channels."""

    uses_latent = True
    whole_tensor = True  # t (tᵀg) couples every element: kernels only

    def __init__(self, chi=None, **kwargs):
        super().__init__(**kwargs)
        if chi is not None:
            if isinstance(chi, bool):
                raise ValueError(f"WCG: `chi` must be a float >= 0 or None, got {chi!r}.")
            chi = float(chi)
            if not (chi >= 0.0 and math.isfinite(chi)):
                raise ValueError(f"WCG: `chi` must be a finite float >= 0 or None, got {chi}.")
        self.chi = chi

    def chi_for(self, shape) -> float:
        """χ for a kernel of ``shape``: the configured value, or 1/out_channels (last axis)."""
        if self.chi is not None:
            return self.chi
        if not shape or shape[-1] is None:
            raise ValueError(f"WCG: cannot read out_channels from kernel shape {shape}; pass `chi`.")
        return 1.0 / int(shape[-1])

    def context(self, z, q, staircase, x=None, training=None):
        return {"x": x, "chi": self.chi_for(tuple(x.shape)),
                "to_unit": float(staircase.hi - staircase.lo) / 2.0}

    def gradient(self, upstream, ctx):
        x = ctx["x"]
        g_hat = upstream * ctx["to_unit"]          # ∂ℓ/∂Ŵ on the [−1, 1] scale
        g_x = weak_curvature_gradient(g_hat, ops.cast(x, upstream.dtype), ctx["chi"])
        return ops.zeros_like(upstream), ops.cast(g_x, x.dtype)

    def get_config(self):
        return {"chi": self.chi}


@keras.saving.register_keras_serializable(package="kquant_maniquant")
class UnitClip(keras.constraints.Constraint):
    """Keeps latent weights in ``[−limit, limit]`` (ManiQuant: ``[−1, 1]``) after each update."""

    def __init__(self, limit=1.0):
        limit = float(limit)
        if not (limit > 0 and math.isfinite(limit)):
            raise ValueError(f"UnitClip: `limit` must be a positive finite float, got {limit}.")
        self.limit = limit

    def __call__(self, w):
        return ops.clip(w, -self.limit, self.limit)

    def get_config(self):
        return {"limit": self.limit}
