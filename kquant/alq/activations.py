"""Multi-bit activation quantization of ALQ (paper §4): ``x̂ = x_ref + Dγ``.

``D ∈ {±1}^{N×I_x}``, ``γ ∈ R₊^{I_x}``: each activation takes the nearest of
the ``2^{I_x}`` levels ``x_ref + bᵀγ``. It replaces ReLU (the input is
rectified first, so the lowest level starts at 0). During training, ``x_ref``
and ``γ`` follow a running average of the batch least-squares fit
``min ‖relu(x) − [1, D][x_ref; γ]‖²`` for the current codes ``D``
(initialised on the first batch to uniform levels spanning
``[0, mean + 3·std]``). Backward: straight-through inside the level range,
zero outside (clipped STE). One global bitwidth is the usual choice.

The statistics are those of the *global* batch: under ``tf.distribute`` the
sufficient statistics (``[1, D]ᵀ[1, D]``, ``[1, D]ᵀx``, counts, sums, min/max)
are summed over replicas before solving (:mod:`kquant.distribute`). A batch
whose statistics are not finite leaves ``x_ref``, ``γ`` and the initialisation
flag unchanged (initialisation waits for the first finite training batch; an
inference call never initialises). The statistics are written by the
optimizer's step, not by the forward pass (:mod:`kquant.step_state`): a step
the optimizer skips (ALQ's per-step guard, ``SkipNonFinite``, a loss-scale
overflow; e.g. a NaN label behind finite activations) leaves them unchanged
too. Levels are computed in float32 whatever the dtype policy; the output is
cast to the compute dtype.
"""

from __future__ import annotations

import keras
from keras import ops

from kquant import distribute, step_state
from kquant.alq.steps import sign_patterns


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"`bits` (I_x) must be an integer in [1, 8], got {bits!r}.")
    return bits


@keras.saving.register_keras_serializable(package="kquant")
class ALQActivation(keras.layers.Layer):
    """Step activation with ``2^bits`` levels ``x_ref + bᵀγ`` (ALQ §4)."""

    def __init__(self, bits=2, momentum=0.9, rectify=True, **kwargs):
        kwargs.setdefault("autocast", False)  # state and levels stay float32 under mixed precision
        super().__init__(**kwargs)
        self.bits = _check_bits(bits)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.rectify = bool(rectify)
        self._patterns = sign_patterns(self.bits)

    @property
    def precision(self) -> int:
        return self.bits

    def build(self, input_shape):
        self.reference = step_state.add_statistic(self, "reference", (), "zeros")
        self.gamma = step_state.add_statistic(self, "gamma", (self.bits,), "ones")
        self.initialized = step_state.add_statistic(self, "initialized", (), "zeros")

    def levels(self, reference=None, gamma=None):
        """Sorted levels ``[2^bits]`` and the sign pattern index of each."""
        reference = self.reference if reference is None else reference
        gamma = self.gamma if gamma is None else gamma
        patterns = ops.convert_to_tensor(self._patterns)
        values = reference + ops.matmul(patterns, ops.reshape(gamma, (-1, 1)))[:, 0]
        order = ops.argsort(values)
        return ops.take(values, order), order

    def _nearest(self, x, reference, gamma):
        """Index into the sorted levels of the nearest level (a pass per level boundary)."""
        sorted_levels, order = self.levels(reference, gamma)
        midpoints = 0.5 * (sorted_levels[1:] + sorted_levels[:-1])
        index = ops.zeros(ops.shape(x), dtype="int32")
        for k in range(2**self.bits - 1):
            index = index + ops.cast(x > midpoints[k], "int32")
        return index, sorted_levels, order

    def _batch_fit(self, target, reference, gamma):
        """Least-squares ``[x_ref, γ]`` of the batch for its current codes ``D``."""
        flat = ops.reshape(target, (-1,))
        index, _, order = self._nearest(flat, reference, gamma)
        codes = ops.take(ops.convert_to_tensor(self._patterns), ops.take(order, index), axis=0)
        features = ops.concatenate([ops.ones_like(codes[:, :1]), codes], axis=1)
        count = distribute.replica_sum(ops.cast(ops.shape(flat)[0], "float32"))
        gram = distribute.replica_sum(ops.matmul(ops.transpose(features), features)) / count
        gram = gram + 1e-6 * ops.eye(self.bits + 1)
        moment = ops.matmul(ops.transpose(features), ops.reshape(flat, (-1, 1)))
        rhs = distribute.replica_sum(moment) / count
        solution = ops.solve(gram, rhs)[:, 0]
        return solution[0], ops.abs(solution[1:])

    def _initial(self, target):
        count = distribute.replica_sum(ops.cast(ops.size(target), "float32"))
        mean = distribute.replica_sum(ops.sum(target)) / count
        square = distribute.replica_sum(ops.sum(target * target)) / count
        variance = ops.maximum(square - mean * mean, 0.0)
        low = ops.maximum(distribute.replica_min(ops.min(target)), 0.0)
        high = ops.minimum(mean + 3.0 * ops.sqrt(variance), distribute.replica_max(ops.max(target)))
        high = ops.maximum(high, low + 1e-3)
        steps = ops.convert_to_tensor([2.0**i for i in range(self.bits)]) / (2.0**self.bits - 1)
        return 0.5 * (low + high), 0.5 * (high - low) * steps

    def call(self, inputs, training=None):
        inputs = ops.cast(inputs, "float32")
        target = ops.relu(inputs) if self.rectify else inputs
        # statistics get no autodiff gradient: theirs is the new value (step_state.commit)
        reference, gamma, initialized = (ops.stop_gradient(ops.convert_to_tensor(v))
                                         for v in (self.reference, self.gamma, self.initialized))
        statistics = None
        if training and self.trainable:
            start_ref, start_gamma = self._initial(target)
            fresh = initialized > 0
            prior_ref = ops.where(fresh, reference, start_ref)
            prior_gamma = ops.where(fresh, gamma, start_gamma)
            batch_ref, batch_gamma = self._batch_fit(target, prior_ref, prior_gamma)
            m = self.momentum
            new_ref = m * prior_ref + (1 - m) * batch_ref
            new_gamma = m * prior_gamma + (1 - m) * batch_gamma
            ok = ops.logical_and(ops.all(ops.isfinite(new_gamma)), ops.isfinite(new_ref))
            reference = ops.where(ok, new_ref, reference)
            gamma = ops.where(ok, new_gamma, gamma)
            statistics = (reference, gamma, ops.where(ok, ops.ones_like(initialized), initialized))
        index, sorted_levels, _ = self._nearest(target, reference, gamma)
        quantized = ops.take(sorted_levels, index)
        clipped = ops.clip(target, sorted_levels[0], sorted_levels[-1])
        outputs = clipped + ops.stop_gradient(quantized - clipped)
        if statistics is not None:
            outputs = step_state.commit(outputs, (self.reference, self.gamma, self.initialized),
                                        statistics)
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "momentum": self.momentum,
                "rectify": self.rectify}
