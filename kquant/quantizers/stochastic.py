"""Stochastic binarization (Courbariaux et al. 2015, BinaryConnect).

In training ``Q(x) = +1`` with probability ``p = hard_sigmoid(x) = clip((x+1)/2, 0, 1)``
and ``−1`` otherwise; at inference the deterministic ``sign(x)`` (``sign(0) = +1``).
Sampling is ``sign(x + u)`` with ``u ~ U[−1, 1)``, since ``P(x + u ≥ 0) = p``;
``u`` comes from a :class:`keras.random.SeedGenerator` (as in Keras' Dropout),
whose state is a variable of the quantizer, so it works under ``jit_compile``,
on every backend and under distribution strategies; training calls draw it
inside the fused forward half (:mod:`kquant.noise`), never materialised.

The backward pass is the estimator's slope at the noise-free ``s = x`` (as if
the deterministic sign had been taken): the default ``"ste"`` is
BinaryConnect's ``g_x = g`` (the paper also clips the latent weights to
``[−1, 1]`` after each update: give the layer such a ``kernel_constraint``).
"""

import keras
from keras import ops

from kquant.noise import uniform_source
from kquant.quantizers.base import Quantizer, apply_slope
from kquant.quantizers.fused import is_ste, one_input
from kquant.staircase import Staircase

_SIGN = Staircase.sign()


@keras.saving.register_keras_serializable(package="kquant")
class StochasticSign(Quantizer):
    """BinaryConnect stochastic sign: +1 w.p. clip((x+1)/2, 0, 1) in training, else sign(x)."""

    default_estimator = "ste"

    def __init__(self, seed=None, estimator=None, **kwargs):
        super().__init__(estimator=estimator, **kwargs)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be None or an int, got {seed!r}.")
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def precision(self):
        return 1

    @property
    def staircase(self):
        return _SIGN

    def pre(self, x, training=None):
        if not training:
            return x, {}
        source, sample = self._noise(x)
        noise = sample(source)
        latent = ops.stop_gradient(x)
        # the sample minus sign(x), in {−2, 0, 2}: exact; no gradient (the estimator sees s = x)
        flip = self.staircase.hard(latent + noise) - self.staircase.hard(latent)
        return x, {"flip": ops.stop_gradient(flip)}

    def post(self, q, params):
        return q + params["flip"] if "flip" in params else q

    def _noise(self, x):
        return uniform_source(ops.shape(x), -1.0, 1.0, keras.backend.standardize_dtype(x.dtype),
                              self.seed_generator)

    def fused(self, x, slope, training=None):
        """Training calls: ``sign(x + u)`` with ``u`` drawn inside the forward half,
        ``∂ℓ/∂x = F'(x)·g``; the same values as ``pre``/``post`` (``sign(x) + flip``)."""
        if training is not True or not self._fusable(StochasticSign):
            return None
        st = self.staircase
        source, sample = self._noise(x)

        def forward(x, source):
            return st.hard(x + sample(source))

        def backward(g, x):
            return apply_slope(g, slope, lambda: x)

        # the STE is BinaryConnect's g_x = g
        return one_input(forward, backward, x, training, extra=(source,), identity=is_ste(slope))

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
