"""Base classes of gradient estimators (the backward half of a quantizer).

An estimator replaces ``d step/dz`` of the quantizer's staircase (see
:mod:`kquant.staircase`). Three kinds share one base class:

* **elementwise** (:class:`ElementwiseEstimator`): a surrogate slope
  ``F'(s)`` of the normalised boundary distance ``s``; ``g_z = g_q · F'(s)``.
* **whole-tensor**: override :meth:`Estimator.gradient`, which sees the whole
  upstream gradient and the forward context (e.g. ManiQuant's ``t (tᵀg)``).
  Set ``uses_latent = True`` to also receive the quantizer's latent input
  ``x`` and return a gradient for it.
* **stateful**: create variables in :meth:`build` (e.g. EWGS's δ); the
  estimator is a Keras layer owned by its quantizer, so they are tracked,
  saved and restored with the model.

Everything the backward pass needs is computed in :meth:`context` during the
forward pass (variables are read there), so the gradient function only sees
tensors, as ``keras.ops.custom_gradient`` requires on every backend.
"""

from __future__ import annotations

import keras
from keras import ops


def as_tensor(value):
    """A plain tensor, never a variable (TF's ``custom_gradient`` rejects variables)."""
    if isinstance(value, keras.Variable):
        return ops.copy(value)
    return ops.convert_to_tensor(value)


class Estimator(keras.layers.Layer):
    """Backward rule of a quantizer's discrete step."""

    #: ``True``: :meth:`gradient` also receives ``x`` and returns ``(g_z, g_x)``.
    uses_latent = False
    #: ``True``: the gradient of one element depends on other elements of the tensor
    #: (e.g. ManiQuant's ``t (tᵀg)``); such estimators are refused on input quantizers,
    #: where they would mix the examples of a batch.
    whole_tensor = False

    def __init__(self, **kwargs):
        kwargs.setdefault("trainable", True)
        super().__init__(**kwargs)

    def build(self, input_shape=None):
        self.built = True

    # -- forward -------------------------------------------------------------
    def context(self, z, q, staircase, x=None, training=None):
        """Tensors the backward pass needs, computed in the forward pass."""
        return {"z": z, "q": q, "s": staircase.distance(z), "x": x}

    def step(self, z, staircase, x=None, training=None):
        """``staircase.hard(z)`` forward, :meth:`gradient` backward.

        The context is built outside the custom-gradient function (TF's
        ``custom_gradient`` may not read variables inside it) and closed over.
        """
        z = as_tensor(z)
        q = staircase.hard(ops.stop_gradient(z))
        if self.uses_latent:
            x = as_tensor(x)
            ctx = self.context(ops.stop_gradient(z), q, staircase,
                               x=ops.stop_gradient(x), training=training)

            @ops.custom_gradient
            def fn(z, x):
                def grad(*args, upstream=None):
                    upstream = args[0] if upstream is None else upstream
                    g_z, g_x = self.gradient(upstream, ctx)
                    return g_z, g_x

                return staircase.hard(z), grad

            return fn(z, x)

        ctx = self.context(ops.stop_gradient(z), q, staircase, x=None, training=training)

        @ops.custom_gradient
        def fn(z):
            def grad(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream
                return (self.gradient(upstream, ctx),)

            return staircase.hard(z), grad

        return fn(z)

    # -- backward ------------------------------------------------------------
    def gradient(self, upstream, ctx):
        """``∂ℓ/∂z`` from ``upstream = ∂ℓ/∂q`` (and ``∂ℓ/∂x`` if ``uses_latent``)."""
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ElementwiseEstimator(Estimator):
    """``g_z = g_q · F'(s)``: a surrogate slope of the boundary distance ``s``.

    Subclasses implement :meth:`derivative` ``F'(s)`` and, where it has a
    closed form, :meth:`surrogate` ``F(s)`` (used by tests and by
    :mod:`kquant.analysis`). ``|s| ≤ 1`` is the representable range.
    """

    def derivative(self, s):
        raise NotImplementedError

    def surrogate(self, s):
        raise NotImplementedError(f"{type(self).__name__} has no closed-form surrogate")

    def fused_slope(self):
        """``F'`` (a function of ``s``) for a quantizer that folds this estimator into its
        own one-pass backward (:meth:`kquant.quantizers.Quantizer.fused`); ``None`` when
        ``F'`` reads state or the step, context or gradient is not the plain one. STE: ``1.0``."""
        base = ElementwiseEstimator
        plain = (type(self).step is Estimator.step and type(self).context is base.context
                 and type(self).gradient is base.gradient)
        if not plain or self.uses_latent or self.variables:
            return None
        return self.derivative

    def context(self, z, q, staircase, x=None, training=None):
        if self.variables:  # F' reads state: evaluate it in the forward pass (see module doc)
            return {"derivative": self.derivative(staircase.distance(z))}
        # stateless F': keep only z and recompute s and F'(s) in the backward pass, where
        # it fuses with the product (one elementwise pass, no saved derivative tensor)
        return {"z": z, "staircase": staircase}

    def gradient(self, upstream, ctx):
        derivative = ctx.get("derivative")
        if derivative is None:
            derivative = self.derivative(ctx["staircase"].distance(ctx["z"]))
        return upstream * ops.cast(derivative, upstream.dtype)
