"""Stochastic binarization (Courbariaux et al. 2015, BinaryConnect).

In training ``Q(x) = +1`` with probability ``p = hard_sigmoid(x) = clip((x+1)/2, 0, 1)``
and ``−1`` otherwise; at inference the deterministic ``sign(x)`` (``sign(0) = +1``).
Sampling is ``sign(x + u)`` with ``u ~ U[−1, 1)``, since ``P(x + u ≥ 0) = p``;
``u`` comes from a :class:`keras.random.SeedGenerator` (as in Keras' Dropout),
whose state is a variable of the quantizer, so it works under ``jit_compile``,
on every backend and under distribution strategies.

The backward pass is the estimator's slope at the noise-free ``s = x`` (as if
the deterministic sign had been taken): the default ``"ste"`` is
BinaryConnect's ``g_x = g`` (the paper also clips the latent weights to
``[−1, 1]`` after each update: give the layer such a ``kernel_constraint``).
"""

import keras
from keras import ops

from kquant.quantizers.base import Quantizer
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
        noise = keras.random.uniform(ops.shape(x), minval=-1.0, maxval=1.0,
                                     dtype=keras.backend.standardize_dtype(x.dtype),
                                     seed=self.seed_generator)
        latent = ops.stop_gradient(x)
        # the sample minus sign(x), in {−2, 0, 2}: exact; no gradient (the estimator sees s = x)
        flip = self.staircase.hard(latent + noise) - self.staircase.hard(latent)
        return x, {"flip": ops.stop_gradient(flip)}

    def post(self, q, params):
        return q + params["flip"] if "flip" in params else q

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}
