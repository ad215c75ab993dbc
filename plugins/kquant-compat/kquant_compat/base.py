"""The shape every compat quantizer shares: kquant's forward, the original backward.

The forward pass is kquant's ``post(staircase(pre(x)))`` (so ``encode``/``decode``,
deployment and mixed precision are kquant's own); subclasses give the forward
maps as :meth:`level_map` and :meth:`value_map`. The backward pass is the original
library's own rule, an elementwise derivative ``D(x)`` in the latent units
(``g_x = g·D(x)``), carried by a term that is exactly zero in the forward pass
(added unless ``training=False``, i.e. also for a plain ``model(x)``). Those rules
are part of what the names mean, so ``estimator=`` is refused with a pointer to
kquant's own quantizers, where the estimator is a free choice.
"""

from __future__ import annotations

from keras import ops

from kquant.quantizers import Quantizer


class CompatQuantizer(Quantizer):
    """A Larq/QKeras quantizer: kquant staircase forward, the library's ``D(x)`` backward."""

    #: Where the name comes from (for error messages).
    library = ""
    #: ``True``: gradients flow through :meth:`level_map`/:meth:`value_map` with kquant's
    #: STE on the rounding instead of ``D(x)`` (Larq's DoReFa weights).
    through_levels = False

    def __init__(self, estimator=None, **kwargs):
        if estimator is not None:
            raise ValueError(
                f"`estimator`: {type(self).__name__} reproduces {self.library}'s backward rule; "
                "use a kquant quantizer (e.g. 'sign', 'uniform') to choose an estimator."
            )
        super().__init__(**kwargs)  # the base's estimator is the STE: only used by through_levels

    def level_map(self, x):
        """``(z, params)``: ``x`` in staircase units (forward only)."""
        raise NotImplementedError

    def value_map(self, q, params):
        """The output for staircase levels ``q``."""
        raise NotImplementedError

    def derivative(self, x):
        """``D(x) = ∂Q/∂x`` as the original library computes it."""
        raise NotImplementedError

    def pre(self, x, training=None):
        if self.through_levels:
            return self.level_map(x)
        latent = ops.stop_gradient(x)
        z, params = self.level_map(latent)
        if training is not False:
            carrier = x * ops.stop_gradient(ops.cast(self.derivative(latent), x.dtype))
            params = {**params, "carrier": carrier - ops.stop_gradient(carrier)}
        return ops.stop_gradient(z), params

    def post(self, q, params):
        y = self.value_map(q, params)
        return y + params["carrier"] if "carrier" in params else y

    def get_config(self):
        return {"name": self.name}
