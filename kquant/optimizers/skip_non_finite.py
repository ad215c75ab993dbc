"""Skip training steps whose gradients are not finite.

Latent-weight QAT keeps its quantized state in float variables (the latent
kernel, learnable steps, EWGS intervals); one NaN/inf gradient passed to Adam
poisons weights and moments for good. ``SkipNonFinite(inner)`` applies the
inner optimizer only when every gradient of the step is finite; otherwise the
step is skipped (weights, moments and ``iterations`` unchanged) and counted
in ``skipped_steps``.

It reuses the skip machinery of ``keras.optimizers.LossScaleOptimizer``
(``ops.cond`` around the inner step, with the cross-replica handling that
``tf.distribute`` needs), with the loss scale fixed at 1: gradients are
passed through untouched and nothing is halved after a skipped step.
"""

from __future__ import annotations

import warnings

import keras
from keras import ops


@keras.saving.register_keras_serializable("kquant")
class SkipNonFinite(keras.optimizers.LossScaleOptimizer):
    """Wraps ``inner_optimizer``; a step with any NaN/inf gradient is skipped.

    Args:
        inner_optimizer: the optimizer doing the real update (Adam, SGD, ...), or
            its name / config for :func:`kquant.optimizers.get`.
        name: optional name.

    ``skipped_steps`` is the number of skipped steps so far; the
    :class:`kquant.callbacks.NonFiniteReport` callback warns once when it
    becomes non-zero.
    """

    def __init__(self, inner_optimizer, name=None, **kwargs):
        if isinstance(inner_optimizer, (str, dict)):  # a name or config (kquant.optimizers.get)
            from kquant.optimizers import get

            inner_optimizer = get(inner_optimizer)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "SkipNonFinite: `inner_optimizer` must be a keras.optimizers.Optimizer, "
                f"got {type(inner_optimizer).__name__}."
            )
        if kwargs:
            raise ValueError(
                "SkipNonFinite does not take arguments "
                f"{sorted(kwargs)}; set them on the `inner_optimizer`."
            )
        super().__init__(inner_optimizer, initial_scale=1.0, name=name)
        self._warned = False

    # The parent's ``step_counter`` is reused as the skipped-step counter and
    # its ``dynamic_scale`` stays at 1.
    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped for non-finite gradients."""
        if not self.built:
            return 0
        return int(ops.convert_to_numpy(self.step_counter.value))

    def scale_loss(self, loss):
        return loss

    def _stateful_handle_finite_grads(self, grads, trainable_variables):
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def _stateful_handle_non_finite_grads(self):
        self.step_counter.assign_add(1)

    def _stateless_handle_finite_grads(self, optimizer_variables, grads, trainable_variables):
        own = list(optimizer_variables[: len(self._variables)])
        new_trainable, new_inner = self.inner_optimizer.stateless_apply(
            list(optimizer_variables[len(self._variables):]), grads, trainable_variables
        )
        return new_trainable, own + list(new_inner)

    def _stateless_handle_non_finite_grads(self, optimizer_variables, trainable_variables):
        mapping = list(zip(self.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.step_counter.assign_add(1)
        return trainable_variables, [scope.get_current_value(v) for v in self.variables]

    def _tf_apply(self, grads, trainable_variables=None):
        """TensorFlow seam: under ``tf.distribute`` the gradients reaching
        ``apply`` are still per replica (Keras reduces them inside the inner
        update), so the step is finite only if it is finite on *every*
        replica. Keras' own LossScaleOptimizer reads the first replica only
        and lets a NaN from another replica through."""
        import tensorflow as tf

        if tf.distribute.in_cross_replica_context():
            raise ValueError("apply() must be called in a replica context.")
        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            self._common_apply(grads, trainable_variables=trainable_variables)
            return

        def cross_replica(distribution, grads, trainable_variables):
            per_replica = distribution.extended.call_for_each_replica(self.check_finite, args=(grads,))
            finite = tf.reduce_all(tf.stack(distribution.experimental_local_results(per_replica)))

            def apply_fn():
                distribution.extended.call_for_each_replica(
                    self._stateful_handle_finite_grads, args=(grads, trainable_variables))

            ops.cond(finite, apply_fn, self._stateful_handle_non_finite_grads)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, trainable_variables))

    def warn_if_skipped(self) -> int:
        """Warn (once per optimizer) if steps were skipped; returns the count."""
        count = self.skipped_steps
        if count and not self._warned:
            self._warned = True
            warnings.warn(
                f"SkipNonFinite: {count} training step(s) had NaN/inf gradients and were "
                "skipped (weights and optimizer state left unchanged).",
                RuntimeWarning,
                stacklevel=2,
            )
        return count

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        return cls(inner, **config)
