"""MetaQuant estimators: a per-layer handle on the shared meta network.

The estimator of a kernel quantizer keeps the per-coordinate state MetaQuant
needs between steps (the last ``g_Ŵ`` and, for LSTMFC, the LSTM state
``(h, c)``), as non-trainable weights that save with the model. Its own
backward rule is the straight-through one (``g_z = g_q``; on the binary BWN/sign
staircase ``g_q·1{|W| ≤ 1}`` as in the authors' code): that is what the
forward of the *next* step differentiates through (as in the authors' code),
and what a plain ``model.fit`` would use. The learned meta gradient itself is
applied by :class:`kquant_metaquant.MetaQuant`, whose train step carries out
the late weight update (paper Eq. 6–8, Alg. 1).
"""

from __future__ import annotations

from keras import ops

from kquant.estimators import Estimator
from kquant_metaquant.meta_networks import META_NETWORKS


class MetaQuantEstimator(Estimator):
    """MetaQuant: learned meta gradient g_W̃ = M_φ(g_Ŵ, W̃), trained through the late weight update."""

    #: fixed by the named subclasses (``fcgrad``, ``multifc``, ``lstmfc``)
    fixed_meta_network = None

    def __init__(self, meta_network="multifc", hidden=100, num_layers=None, activation=None,
                 use_bias=False, init="random", **kwargs):
        super().__init__(**kwargs)
        if self.fixed_meta_network is not None:
            meta_network = self.fixed_meta_network
        if meta_network not in META_NETWORKS:
            raise ValueError(
                f"`meta_network` must be one of {sorted(META_NETWORKS)}, got {meta_network!r}."
            )
        # validates hidden / num_layers / activation with the network's own rules
        probe = META_NETWORKS[meta_network](hidden=hidden, activation=activation, use_bias=use_bias,
                                            init=init,
                                            **({} if num_layers is None else {"num_layers": num_layers}))
        self.meta_network = meta_network
        self.hidden = probe.hidden
        self.num_layers = probe.num_layers
        self.activation = activation
        self.use_bias = probe.use_bias
        self.init = probe.init
        self._state_count = probe.state_count
        #: set only inside MetaQuant's train step: a zero tensor added to the
        #: staircase output so that its gradient is ``g_q``.
        self._gradient_probe = None

    # -- the shared network this estimator asks for ---------------------------
    def meta_spec(self) -> dict:
        return {"kind": self.meta_network, "hidden": self.hidden,
                "num_layers": self.num_layers, "activation": self.activation,
                "use_bias": self.use_bias, "init": self.init}

    # -- per-coordinate state ---------------------------------------------------
    def build(self, input_shape=None):
        shape = tuple(input_shape or ())
        if not shape or any(d is None for d in shape):
            raise ValueError(
                f"{type(self).__name__} learns weight gradients: use it as the estimator of a "
                f"kernel quantizer (fully known shape), got input shape {shape}. Give "
                "activation quantizers their own estimator, e.g. "
                "kernel_quantizer=kquant.quantizer('dorefa', estimator='multifc')."
            )
        n = 1
        for d in shape:
            n *= int(d)
        self.previous_gradient = self.add_weight(
            shape=shape, initializer="zeros", trainable=False, name="previous_gradient")
        self.meta_state = [
            self.add_weight(shape=(n, self.hidden), initializer="zeros", trainable=False,
                            name=f"meta_state_{i}")
            for i in range(self._state_count)
        ]
        self.built = True

    # -- forward / backward -------------------------------------------------------
    def context(self, z, q, staircase, x=None, training=None):
        # The authors' BWN/sign STE is g·1{|W| ≤ 1} (binary staircase: z = W); the
        # DoReFa staircase never leaves its range. Only the φ path sees this gate:
        # g_Ŵ is read through a probe added after the step.
        if staircase.binary:
            return {"gate": ops.cast(ops.abs(z) <= 1.0, z.dtype)}
        return {}

    def step(self, z, staircase, x=None, training=None):
        q = super().step(z, staircase, x=x, training=training)
        if self._gradient_probe is not None:
            q = q + self._gradient_probe
        return q

    def gradient(self, upstream, ctx):
        if "gate" in ctx:
            return upstream * ops.cast(ctx["gate"], upstream.dtype)
        return upstream

    def get_config(self):
        config = {"hidden": self.hidden, "num_layers": self.num_layers,
                  "activation": self.activation}
        if self.use_bias:
            config["use_bias"] = True
        if self.init != "random":
            config["init"] = self.init
        if self.fixed_meta_network is None:
            config["meta_network"] = self.meta_network
        return config


class FCGrad(MetaQuantEstimator):
    """MetaQuant FCGrad: g_W̃ = FCs(g_Ŵ) (shared meta network, late weight update)."""

    fixed_meta_network = "fcgrad"


class MultiFC(MetaQuantEstimator):
    """MetaQuant MultiFC: g_W̃ = g_Ŵ · FCs(W̃) (shared meta network, late weight update)."""

    fixed_meta_network = "multifc"


class LSTMFC(MetaQuantEstimator):
    """MetaQuant LSTMFC: g_W̃ = g_Ŵ · FC(LSTM(W̃)), per-coordinate LSTM state."""

    fixed_meta_network = "lstmfc"
