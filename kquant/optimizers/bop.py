"""Bop, the binary optimizer (Helwegen et al., NeurIPS 2019, "Latent weights do
not exist: rethinking binarized neural network optimization").

A binary weight ``w ∈ {−1, +1}`` has no latent float value; Bop keeps an
exponential moving average of its gradient and flips the weight when the
average is strong enough and points the same way as the weight::

    m ← (1 − γ)·m + γ·g
    w ← −w   where |m| > τ and sign(m) = sign(w)    (i.e. m·w > τ)

``γ`` (adaptivity rate) plays the part of a learning rate and may be a
``keras.optimizers.schedules`` schedule; ``τ`` is the threshold. A variable
that does not hold ±1 yet is read as ``sign(w)`` (``sign(0) = +1``), so
after the first step every weight is exactly ±1.

Bop trains binary weights only: route the other variables to another
optimizer with :class:`~kquant.optimizers.RoutingOptimizer` (predicate
``"binary_kernels"``).
"""

from __future__ import annotations

import keras
from keras import ops

from kquant.optimizers.predicates import is_binary_variable
from kquant.validation import check_number


@keras.saving.register_keras_serializable("kquant")
class Bop(keras.optimizers.Optimizer):
    """Binary optimizer: ``m ← (1−γ)m + γg``; flip ``w`` where ``m·w > τ`` (Helwegen et al. 2019).

    Args:
        threshold: ``τ ≥ 0``.
        gamma: adaptivity rate ``γ ∈ (0, 1]``, or a ``LearningRateSchedule``
            (evaluated at ``iterations``, like a learning rate).
        name: optional name.
        **kwargs: gradient clipping and the other base-optimizer options;
            ``weight_decay`` and ``use_ema`` are refused (they would move the
            weights off ±1).

    :meth:`flip_ratio` is the share of binary weights flipped by the last step.
    """

    binary_only = True

    def __init__(self, threshold=1e-8, gamma=1e-4, name="bop", **kwargs):
        for arg in ("weight_decay", "use_ema"):
            if kwargs.get(arg):
                raise ValueError(f"Bop: `{arg}` does not apply to binary weights "
                                 f"(it would move them off ±1), got {kwargs[arg]!r}.")
        if "learning_rate" in kwargs:
            raise ValueError("Bop has no `learning_rate`; its rate is `gamma`.")
        if not isinstance(gamma, keras.optimizers.schedules.LearningRateSchedule):
            gamma = check_number(gamma, "gamma", gt=0.0, le=1.0)
        threshold = check_number(threshold, "threshold", ge=0.0)
        super().__init__(learning_rate=gamma, name=name, **kwargs)
        self.threshold = threshold

    @property
    def gamma(self):
        """The current adaptivity rate ``γ`` (a scalar tensor)."""
        return self.learning_rate

    def build(self, variables):
        if self.built:
            return
        not_binary = [v.path for v in variables if not is_binary_variable(v)]
        if not_binary:
            raise ValueError(
                f"Bop trains binary (±1) weights only, got the non-binary variable(s) "
                f"{not_binary}. Route them to another optimizer: kquant.optimizers."
                "RoutingOptimizer([('binary_kernels', Bop())], default=keras.optimizers.Adam()); "
                "mark a hand-made binary variable with kquant.optimizers.mark_binary.")
        super().build(variables)
        self._momentums = self.add_optimizer_variables(variables, "momentum")
        self._flips = [self.add_variable((), initializer="zeros", dtype="float32",
                                         name=f"flips_{i}") for i in range(len(variables))]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        m = self._momentums[index]
        gamma = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        new_m = ops.add(m, ops.multiply(gamma, ops.subtract(gradient, m)))
        binary = ops.where(ops.greater_equal(variable, 0.0), 1.0, -1.0)
        binary = ops.cast(binary, variable.dtype)
        flip = ops.greater(ops.multiply(new_m, binary), self.threshold)
        self.assign(m, new_m)
        self.assign(variable, ops.where(flip, ops.negative(binary), binary))
        self.assign(self._flips[index], ops.sum(ops.cast(flip, "float32")))

    def flip_ratio(self) -> float:
        """Share of the binary weights that the last step flipped (0 before any step)."""
        if not self.built or not self._trainable_variables:
            return 0.0
        flipped = sum(float(ops.convert_to_numpy(f.value)) for f in self._flips)
        total = sum(int(ops.size(v)) for v in self._trainable_variables)
        return flipped / total

    def get_config(self):
        config = super().get_config()
        gamma = config.pop("learning_rate")
        for key in ("weight_decay", "use_ema", "ema_momentum", "ema_overwrite_frequency"):
            config.pop(key, None)
        return {**config, "threshold": self.threshold, "gamma": gamma}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("gamma"), dict):
            config["gamma"] = keras.saving.deserialize_keras_object(
                config["gamma"], custom_objects=custom_objects)
        return cls(**config)
