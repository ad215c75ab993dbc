"""The EWGS estimator (Lee, Kim & Ham, "Network Quantization with Element-wise
Gradient Scaling", CVPR 2021, Eq. 4).

Paper, in the interval-normalised coordinates ``x_n ∈ [0, 1]`` and
``x_q = round((2^b−1)·x_n)/(2^b−1)``::

    g_xn = g_xq · (1 + δ · sign(g_xq) · (x_n − x_q)),    δ ≥ 0

kquant's estimators act on the staircase step ``q = hard(z)`` with levels on
the integers ``lo..hi``. With ``x_n = (z − lo)/(hi − lo)`` and
``x_q = (q − lo)/(hi − lo)`` (for the EWGS quantizer ``lo = 0``,
``hi = 2^b − 1``, exactly the paper's variables) the chain rule gives
``g_xq = (hi − lo)·g_q``, ``g_z = g_xn/(hi − lo)``, and sign is unchanged::

    g_z = g_q · (1 + δ · sign(g_q) · (z̄ − q)/(hi − lo)),   z̄ = clip(z, lo, hi)

so δ keeps the paper's meaning (units of ``x_q``) on every staircase; for
``sign`` (levels ±1) ``hi − lo = 2``. ``δ = 0`` is exactly STE. Outside the
range ``z̄ − q = 0``: STE there too (the EWGS quantizer clips before the step).
"""

from __future__ import annotations

import math

from keras import ops

from kquant.estimators.base import Estimator


class EWGS(Estimator):
    """EWGS: g_xn = g_xq·(1 + δ·sign(g_xq)·(x_n − x_q)); δ fixed or refreshed by DeltaUpdate."""

    def __init__(self, delta=0.0, adaptive=True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(delta, bool):
            raise ValueError(f"EWGS: `delta` must be a float >= 0, got {delta!r}.")
        try:
            delta = float(delta)
        except (TypeError, ValueError):
            raise ValueError(f"EWGS: `delta` must be a float >= 0, got {delta!r}.") from None
        if not (delta >= 0.0 and math.isfinite(delta)):
            raise ValueError(f"EWGS: `delta` must be a finite float >= 0, got {delta}.")
        self.delta_init = delta
        self.adaptive = bool(adaptive)

    def build(self, input_shape=None):
        # Non-trainable state: saved with the model, refreshed by DeltaUpdate.
        self.delta = self.add_weight(
            name="delta", shape=(),
            initializer=lambda shape, dtype=None: ops.cast(self.delta_init, dtype or "float32"),
            trainable=False, aggregation="only_first_replica",
        )
        self.built = True

    def set_delta(self, value):
        """Set δ (clipped at 0; a NaN/inf value leaves δ unchanged)."""
        value = float(value)
        if math.isfinite(value):
            self.delta.assign(max(0.0, value))

    # -- forward: everything the backward pass needs --------------------------
    def context(self, z, q, staircase, x=None, training=None):
        if not self.built:
            self.build()
        span = float(staircase.hi - staircase.lo)
        error = (ops.clip(z, staircase.lo, staircase.hi) - q) / span  # x_n − x_q
        return {"error": error, "delta": ops.convert_to_tensor(self.delta)}

    def step(self, z, staircase, x=None, training=None):
        q = super().step(z, staircase, x=x, training=training)
        probe = getattr(self, "_probe", None)
        if probe is not None:  # set only by kquant_ewgs.hessian (Hessian w.r.t. q)
            q = probe(self, q, staircase)
        return q

    # -- backward -------------------------------------------------------------
    def gradient(self, upstream, ctx):
        error = ops.cast(ctx["error"], upstream.dtype)
        delta = ops.cast(ctx["delta"], upstream.dtype)
        return upstream * (1.0 + delta * ops.sign(upstream) * error)

    def get_config(self):
        return {"delta": self.delta_init, "adaptive": self.adaptive}
