"""The ALQ optimizer (paper §3.3, Alg. 3–4): projected AMSGrad on ``ŵ = Bα``.

Each ALQ layer's ``kernel_tap`` receives ``∂ℓ/∂ŵ``; from it the optimizer keeps
AMSGrad moments in the weight domain (``[G, n]``) and in the α domain
(``[G, I_max]``, gradient ``g_α = mask ⊙ Bᵀ∂ℓ/∂ŵ + λ₂α``), and with the
quadratic model ``g = a·m/(1−β₁ᵗ)``, ``H = (√v̂ + ε)/√(1−β₂ᵗ)`` updates the
layer's state according to :attr:`ALQ.phase`:

* ``"bases"`` (Alg. 3): rows of ``B`` ← nearest level to ``ŵ − g/H``
  (exhaustive over the ``2^I_max`` sign patterns), then the Eq. 23 refit
  ``α = (BᵀHB + λI)⁻¹Bᵀ(Hŵ_old − g)``, negative α flipped with their bases;
* ``"coordinates"`` (Alg. 4): AMSGrad on α (``a·m̂_α/(√v̂_α + ε)``), negative
  α flipped with their bases;
* ``"prune"``: ALQ state held, only the moments move (Alg. 2 reads them).

Which variables are ALQ state is decided by ownership: :class:`ALQLayer.build`
tags its tap (``"tap"``) and ``bases``/``coordinates``/``mask`` (``"state"``).
Every other trainable variable (biases, BatchNorm, float layers) is trained by
an Adam rule inside the same optimizer, with the same learning rate.

A step whose gradient for a layer is not finite is skipped for that layer
(state and moments unchanged) and counted in ``non_finite_steps``; a warning
is emitted once, when the count can be read (eager ``apply``, or the ALQ
callbacks at epoch end).
"""

from __future__ import annotations

import warnings

import keras
from keras import ops

from kquant.alq import steps
from kquant.alq.layers import ALQ_LAYER, alq_role

PHASES = ("bases", "coordinates", "prune")


def _phase_index(phase):
    if isinstance(phase, str) and phase in PHASES:
        return PHASES.index(phase)
    if isinstance(phase, int) and not isinstance(phase, bool) and 0 <= phase < len(PHASES):
        return phase
    raise ValueError(f"`phase` must be one of {PHASES}, got {phase!r}.")


def _concrete_int(variable):
    """Backend seam: the variable's value as an int, or ``None`` while tracing."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
    value = variable.value
    if backend == "jax":
        import jax

        if isinstance(value, jax.core.Tracer):
            return None
    try:
        return int(ops.convert_to_numpy(value))
    except Exception:  # still symbolic somewhere
        return None


@keras.saving.register_keras_serializable(package="kquant")
class ALQ(keras.optimizers.Optimizer):
    """Loss-aware multi-bit quantization: trains ALQ layers' ``B, α`` directly.

    Args:
        learning_rate: ``a`` of the quadratic model (paper: 1e-3 bases, 1e-4 coordinates).
        beta_1, beta_2, epsilon: AMSGrad constants.
        ridge: ``λ`` of the Eq. 23 refit (paper: 1e-6).
        coordinate_l2: L2 on α in the α-domain gradient (paper §3.3).
        phase: initial phase, one of ``"bases"``, ``"coordinates"``, ``"prune"``.
    """

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, ridge=1e-6,
                 coordinate_l2=1e-5, phase="bases", name="alq", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        for arg, value, low, high in (("beta_1", beta_1, 0.0, 1.0), ("beta_2", beta_2, 0.0, 1.0)):
            if not low <= float(value) < high:
                raise ValueError(f"`{arg}` must be in [0, 1), got {value!r}.")
        for arg, value in (("epsilon", epsilon), ("ridge", ridge), ("coordinate_l2", coordinate_l2)):
            if not float(value) >= 0.0:
                raise ValueError(f"`{arg}` must be >= 0, got {value!r}.")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.ridge, self.coordinate_l2 = float(ridge), float(coordinate_l2)
        self.initial_phase = PHASES[_phase_index(phase)]
        with keras.name_scope(self.name, caller=self):
            self._phase = keras.Variable(_phase_index(phase), name="phase", dtype="int32",
                                         trainable=False, aggregation="only_first_replica")
            self._non_finite = keras.Variable(0, name="non_finite_steps", dtype="int32",
                                              trainable=False, aggregation="only_first_replica")
        self._track_variable(self._phase)
        self._track_variable(self._non_finite)
        self._warned_non_finite = False

    # -- phase and diagnostics ---------------------------------------------------
    @property
    def phase(self) -> str:
        return PHASES[int(ops.convert_to_numpy(self._phase.value))]

    @phase.setter
    def phase(self, value):
        self._phase.assign(_phase_index(value))

    @property
    def phase_variable(self):
        return self._phase

    @property
    def non_finite_steps(self) -> int:
        return int(ops.convert_to_numpy(self._non_finite.value))

    def warn_if_non_finite(self):
        """Warn (once) if some layer step was skipped for a NaN/inf gradient."""
        count = _concrete_int(self._non_finite)
        if count and not self._warned_non_finite:
            self._warned_non_finite = True
            warnings.warn(f"ALQ: {count} layer step(s) had NaN/inf gradients and were skipped "
                          "(bases, coordinates and moments left unchanged).", RuntimeWarning,
                          stacklevel=2)
        return count

    # -- state -------------------------------------------------------------------
    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        roles, layers = [], []
        self._weight_m, self._weight_v, self._weight_vmax = [], [], []
        self._alpha_m, self._alpha_v, self._alpha_vmax = [], [], []
        self._adam_m, self._adam_v = [], []
        for variable in variables:
            role = alq_role(variable)
            layer = getattr(variable, ALQ_LAYER, None) if role == "tap" else None
            roles.append(role)
            layers.append(layer)
            alq = [None] * 6
            adam = [None, None]
            if role == "tap":
                g, n = layer.layout.num_groups, layer.layout.group_size
                shapes = [(g, n)] * 3 + [(g, layer.max_bits)] * 3
                names = ("w_m", "w_v", "w_vmax", "alpha_m", "alpha_v", "alpha_vmax")
                alq = [self.add_variable(shape=s, initializer="zeros", name=f"{layer.name}_{k}")
                       for s, k in zip(shapes, names)]
            elif role is None:
                adam = [self.add_variable_from_reference(variable, name) for name in ("m", "v")]
            for store, value in zip((self._weight_m, self._weight_v, self._weight_vmax,
                                     self._alpha_m, self._alpha_v, self._alpha_vmax), alq):
                store.append(value)
            self._adam_m.append(adam[0])
            self._adam_v.append(adam[1])
        # Plain Python bookkeeping, kept out of Keras' variable tracking.
        object.__setattr__(self, "_roles", roles)
        object.__setattr__(self, "_owner_layers", layers)

    def alpha_moments(self, layer):
        """``(m_α, v_α, v̂_α)`` optimizer variables of an ALQ layer (for pruning)."""
        for i, owner in enumerate(self._owner_layers):
            if owner is layer:
                return self._alpha_m[i], self._alpha_v[i], self._alpha_vmax[i]
        raise KeyError(f"Layer {layer.name!r} is not trained by this ALQ optimizer.")

    def alpha_quadratic_model(self, layer, learning_rate=None):
        """``(g_α, H_α)`` of the α-domain quadratic model (Eq. 12), NumPy."""
        import numpy as np

        m, _, vmax = (np.asarray(ops.convert_to_numpy(v)) for v in self.alpha_moments(layer))
        t = max(int(ops.convert_to_numpy(self.iterations)), 1)
        lr = float(ops.convert_to_numpy(self.learning_rate)) if learning_rate is None \
            else learning_rate
        g = lr * m / (1 - self.beta_1**t)
        h = (np.sqrt(vmax) + self.epsilon) / np.sqrt(1 - self.beta_2**t)
        return g, h

    def _filter_empty_gradients(self, grads, variables):
        # ALQ state has its autodiff gradient cut on purpose: drop it silently.
        kept = [(g, v) for g, v in zip(grads, variables)
                if not (g is None and alq_role(v) == "state")]
        if not kept:
            raise ValueError("No gradients provided for any variable.")
        grads, variables = zip(*kept)
        return super()._filter_empty_gradients(list(grads), list(variables))

    def apply(self, grads, trainable_variables=None):
        result = super().apply(grads, trainable_variables)
        self.warn_if_non_finite()
        return result

    # -- the step ------------------------------------------------------------------
    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        role = self._roles[index]
        if role == "state":
            return
        lr = ops.cast(learning_rate, "float32")
        t = ops.cast(self.iterations + 1, "float32")
        gradient = ops.cast(gradient, "float32")
        finite = ops.all(ops.isfinite(gradient))
        gradient = ops.where(finite, gradient, ops.zeros_like(gradient))
        if role == "tap":
            self._alq_update(index, gradient, finite, lr, t)
        else:
            self._adam_update(index, variable, gradient, finite, lr, t)
        self.assign_add(self._non_finite, ops.where(finite, 0, 1))

    def _adam_update(self, index, variable, gradient, finite, lr, t):
        b1, b2 = self.beta_1, self.beta_2
        m_var, v_var = self._adam_m[index], self._adam_v[index]
        m, v, value = (ops.convert_to_tensor(x) for x in (m_var, v_var, variable))
        m_new = b1 * m + (1 - b1) * gradient
        v_new = b2 * v + (1 - b2) * gradient * gradient
        step = lr * (m_new / (1 - b1**t)) / (ops.sqrt(v_new / (1 - b2**t)) + self.epsilon)
        self.assign(m_var, ops.where(finite, m_new, m))
        self.assign(v_var, ops.where(finite, v_new, v))
        self.assign(variable, ops.where(finite, value - ops.cast(step, value.dtype), value))

    def _alq_update(self, index, gradient, finite, lr, t):
        layer = self._owner_layers[index]
        b1, b2, eps = self.beta_1, self.beta_2, self.epsilon
        bases_var, alpha_var, mask_var = layer.alq_state()
        bases, alpha, mask = (ops.convert_to_tensor(v) for v in (bases_var, alpha_var, mask_var))
        g_w = layer.layout.to_groups(gradient)
        slots = (self._weight_m[index], self._weight_v[index], self._weight_vmax[index],
                 self._alpha_m[index], self._alpha_v[index], self._alpha_vmax[index])
        old = tuple(ops.convert_to_tensor(s) for s in slots)
        m, v, vmax, m_a, v_a, vmax_a = old

        m = b1 * m + (1 - b1) * g_w
        v = b2 * v + (1 - b2) * g_w * g_w
        vmax = ops.maximum(vmax, v)
        g_a = (ops.einsum("gni,gn->gi", bases, g_w) + self.coordinate_l2 * alpha) * mask
        m_a = b1 * m_a + (1 - b1) * g_a
        v_a = b2 * v_a + (1 - b2) * g_a * g_a
        vmax_a = ops.maximum(vmax_a, v_a)
        correction_1, correction_2 = 1 - b1**t, ops.sqrt(1 - b2**t)
        ridge = self.ridge

        def bases_phase(bases, alpha, m_a):
            g = lr * m / correction_1
            h = (ops.sqrt(vmax) + eps) / correction_2
            new_bases, new_alpha = steps.bases_step(bases, alpha, mask, g, h, ridge)
            return new_bases, new_alpha, m_a

        def coordinates_phase(bases, alpha, m_a):
            step = lr * (m_a / correction_1) / (ops.sqrt(vmax_a) / correction_2 + eps)
            return steps.make_positive(bases, (alpha - step) * mask, m_a)

        def prune_phase(bases, alpha, m_a):
            return bases, alpha, m_a

        phase = ops.clip(ops.convert_to_tensor(self._phase), 0, len(PHASES) - 1)
        new_bases, new_alpha, m_a = ops.switch(
            phase, [bases_phase, coordinates_phase, prune_phase], bases, alpha, m_a)

        self.assign(bases_var, ops.where(finite, new_bases, bases))
        self.assign(alpha_var, ops.where(finite, new_alpha, alpha))
        for target, value, previous in zip(slots, (m, v, vmax, m_a, v_a, vmax_a), old):
            self.assign(target, ops.where(finite, value, previous))

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "ridge": self.ridge,
            "coordinate_l2": self.coordinate_l2,
            "phase": self.initial_phase,
        }
