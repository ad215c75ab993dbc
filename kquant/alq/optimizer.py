"""The ALQ optimizer (paper §3.3, Alg. 3–4): projected AMSGrad on ``ŵ = Bα``.

Each ALQ layer's ``kernel_tap`` receives ``∂ℓ/∂ŵ``; from it the optimizer keeps
AMSGrad moments in the weight domain (``[G, n]``) and in the α domain
(``[G, I_max]``, gradient ``g_α = mask ⊙ Bᵀ∂ℓ/∂ŵ + λ₂α``), and with the
quadratic model ``g = a·m/(1−β₁ᵗ)``, ``H = (√v̂ + ε)/√(1−β₂ᵗ)`` updates the
layer's state according to :attr:`ALQ.phase`:

* ``"bases"`` (Alg. 3): rows of ``B`` ← nearest level to ``ŵ − g/H`` (the
  paper's exhaustive search over the ``2^I_max`` sign patterns as a running
  minimum, or, outside XLA, bisection in each group's sorted levels: same
  codes, memory ``O(n·I)``),
  then the Eq. 23 refit ``α = (BᵀHB + λI)⁻¹Bᵀ(Hŵ_old − g)``, negative α
  flipped with their bases and their α first moments;
* ``"coordinates"`` (Alg. 4): AMSGrad on α (``a·m̂_α/(√v̂_α + ε)``), negative
  α flipped with their bases;
* ``"prune"``: ALQ state held, only the moments move (Alg. 2 reads them).

Which variables are ALQ state is decided by ownership: :class:`ALQLayer.build`
tags its tap (``"tap"``) and ``bases``/``coordinates``/``mask`` (``"state"``).
Every other trainable variable (biases, BatchNorm, float layers) is trained by
an Adam rule inside the same optimizer, with the same learning rate, except
running statistics (:mod:`kquant.step_state`, e.g. :class:`~kquant.alq.ALQActivation`'s
``x_ref``/``γ``), which take the value their gradient carries.

A step with any non-finite gradient is skipped as a whole, like
:class:`~kquant.optimizers.SkipNonFinite`: every variable (ALQ state, moments,
biases, running statistics, ``iterations``) keeps its value, and
``non_finite_steps`` counts it.
The decision needs no host read and no extra collective: a non-finite
gradient anywhere turns every gradient of that replica into NaN before the
cross-replica sum, so every variable's summed gradient is non-finite on every
replica. A warning is emitted once, when the count can be read (eager
``apply``, or the ALQ callbacks at epoch end).

Each ALQ layer's step is a pure function of tensors. Where TensorFlow runs the
train step without XLA on one device, the whole update (every layer's step, the
Adam rule, the guard) is one XLA launch (:meth:`ALQ._backend_update_step`), so
the search there is always the fused one.

The optimizer also holds the :class:`~kquant.alq.ALQSchedule` progress
(``schedule_start_bits``, ``prune_start_budget``, ``prune_steps_done``), so a
checkpoint of the model (``BackupAndRestore``, ``model.save``) resumes the
pipeline exactly.
"""

from __future__ import annotations

import warnings

import keras
from keras import ops

from kquant import distribute, step_state, xla
from kquant.alq import steps
from kquant.alq.layers import ALQ_LAYER, alq_role

PHASES = ("bases", "coordinates", "prune")


def _phase_index(phase):
    if isinstance(phase, str) and phase in PHASES:
        return PHASES.index(phase)
    if isinstance(phase, int) and not isinstance(phase, bool) and 0 <= phase < len(PHASES):
        return phase
    raise ValueError(f"`phase` must be one of {PHASES}, got {phase!r}.")


def _host_value(variable):
    """Backend seam: a (possibly distributed) variable's value as NumPy, on the host."""
    value = variable.value
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(value, tf.distribute.DistributedValues) or hasattr(value, "_values"):
            value = tf.distribute.get_strategy().experimental_local_results(value)[0]
        if hasattr(value, "read_value") and not isinstance(value, tf.Tensor):
            value = value.read_value()
    return ops.convert_to_numpy(value)


def _read_int(variable) -> int:
    return int(_host_value(variable))


def _read_float(variable) -> float:
    return float(_host_value(variable))


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


def _poison_all_if_any_non_finite(grads):
    """Every gradient NaN if any is not finite (``None`` stays ``None``)."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in present]))
    return [None if g is None else ops.where(finite, g, ops.full_like(g, float("nan")))
            for g in grads]


def _by_phase(phase, branches, *args):
    """``branches[phase](*args)``, ``phase`` an int32 scalar tensor, as nested
    ``ops.cond``: one branch runs. Not ``ops.switch``: TensorFlow lowers its
    ``switch_case`` to XLA at a cost that grows with the size of every tensor its
    operands derive from through a reduction (the step's finiteness guard reduces
    every gradient): a LeNet5 ALQ model's first train step (its compile) took 32 s on
    TensorFlow without ``jit_compile`` and 68 s with it, 4.5 s and 7.6 s with
    ``cond`` (2-core CPU)."""
    if len(branches) == 1:
        return branches[0](*args)
    return ops.cond(phase == 0, lambda: branches[0](*args),
                    lambda: _by_phase(phase - 1, branches[1:], *args))


@keras.saving.register_keras_serializable(package="kquant")
class ALQ(keras.optimizers.Optimizer):
    """Loss-aware multi-bit quantization: trains ALQ layers' ``B, α`` directly.

    Args:
        learning_rate: ``a`` of the quadratic model (paper: 1e-3 bases, 1e-4 coordinates).
        beta_1, beta_2, epsilon: AMSGrad constants.
        ridge: ``λ`` of the Eq. 23 refit (paper: 1e-6).
        coordinate_l2: L2 on α in the α-domain gradient (paper §3.3).
        phase: initial phase, one of ``"bases"``, ``"coordinates"``, ``"prune"``.
        search: bases search, ``"auto"`` (default: whichever of the two is
            faster for ``I_max`` and the backend, see
            :func:`kquant.alq.steps.resolve_search`), ``"sorted"`` (bisection in
            the sorted levels) or ``"exhaustive"`` (the paper's, all ``2^I``
            levels as a running minimum); both memory ``O(n·I)``, same bases.
    """

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, ridge=1e-6,
                 coordinate_l2=1e-5, phase="bases", search="auto", name="alq", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        for arg, value, low, high in (("beta_1", beta_1, 0.0, 1.0), ("beta_2", beta_2, 0.0, 1.0)):
            if not low <= float(value) < high:
                raise ValueError(f"`{arg}` must be in [0, 1), got {value!r}.")
        for arg, value in (("epsilon", epsilon), ("ridge", ridge), ("coordinate_l2", coordinate_l2)):
            if not float(value) >= 0.0:
                raise ValueError(f"`{arg}` must be >= 0, got {value!r}.")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.ridge, self.coordinate_l2 = float(ridge), float(coordinate_l2)
        if search not in steps.SEARCHES:
            raise ValueError(f"`search` must be one of {steps.SEARCHES}, got {search!r}.")
        self.search = search
        self.initial_phase = PHASES[_phase_index(phase)]
        state = (("_phase", "phase", "int32", _phase_index(phase)),
                 ("_non_finite", "non_finite_steps", "int32", 0),
                 ("_start_bits", "schedule_start_bits", "float32", -1.0),
                 ("_prune_start", "prune_start_budget", "float32", -1.0),
                 ("_prune_done", "prune_steps_done", "int32", 0))
        with keras.name_scope(self.name, caller=self):
            for attr, name, dtype, value in state:
                variable = keras.Variable(value, name=name, dtype=dtype, trainable=False,
                                          aggregation="only_first_replica")
                object.__setattr__(self, attr, variable)
                self._track_variable(variable)
        self._warned_non_finite = False

    def __setattr__(self, name, value):
        # Keras' trackable __setattr__ reads the current attribute first, which
        # inside a tf.distribute scope would run the NumPy getter: set phase directly.
        if name == "phase":
            self._phase.assign(_phase_index(value))
            return
        super().__setattr__(name, value)

    # -- phase and diagnostics ---------------------------------------------------
    @property
    def phase(self) -> str:
        """The current phase (a host read; inside a traced step use :attr:`phase_variable`)."""
        return PHASES[_read_int(self._phase)]

    @property
    def phase_variable(self):
        return self._phase

    @property
    def non_finite_steps(self) -> int:
        """Steps skipped for NaN/inf gradients."""
        return _read_int(self._non_finite)

    def schedule_state(self):
        """``{"start_bits", "prune_start_budget", "prune_steps_done"}`` of the ALQ pipeline
        (``None`` where not yet set), read from the optimizer's saved variables."""
        start, budget = (_read_float(v) for v in (self._start_bits, self._prune_start))
        return {"start_bits": None if start < 0 else start,
                "prune_start_budget": None if budget < 0 else budget,
                "prune_steps_done": _read_int(self._prune_done)}

    def set_schedule_state(self, start_bits=None, prune_start_budget=None, prune_steps_done=None):
        """Record pipeline progress (``-1`` clears a value); see :meth:`schedule_state`."""
        if start_bits is not None:
            self._start_bits.assign(float(start_bits))
        if prune_start_budget is not None:
            self._prune_start.assign(float(prune_start_budget))
        if prune_steps_done is not None:
            self._prune_done.assign(int(prune_steps_done))

    def warn_if_non_finite(self):
        """Warn (once) if some layer step was skipped for a NaN/inf gradient."""
        count = _concrete_int(self._non_finite)
        if count and not self._warned_non_finite:
            self._warned_non_finite = True
            warnings.warn(f"ALQ: {count} training step(s) had NaN/inf gradients and were skipped "
                          "(every variable and optimizer state left unchanged).", RuntimeWarning,
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
            role = "statistic" if step_state.is_statistic(variable) else alq_role(variable)
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
        # The variable whose update also counts the step (a tap if any: it always has a gradient).
        counting = [i for i, r in enumerate(roles) if r == "tap"] or \
            [i for i, r in enumerate(roles) if r is None]
        object.__setattr__(self, "_count_index", counting[0] if counting else -1)

    def alpha_moments(self, layer):
        """``(m_α, v_α, v̂_α)`` optimizer variables of an ALQ layer (for pruning)."""
        for i, owner in enumerate(self._owner_layers):
            if owner is layer:
                return self._alpha_m[i], self._alpha_v[i], self._alpha_vmax[i]
        raise KeyError(f"Layer {layer.name!r} is not trained by this ALQ optimizer.")

    def weight_moments(self, layer):
        """``(m, v, v̂)`` weight-domain ``[G, n]`` optimizer variables of an ALQ layer."""
        for i, owner in enumerate(self._owner_layers):
            if owner is layer:
                return self._weight_m[i], self._weight_v[i], self._weight_vmax[i]
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

    def _overwrite_variables_directly_with_gradients(self, grads, variables):
        # Running statistics go through the step with every other variable, so the
        # per-step guard (and, on TF, the cross-replica sum) covers them: `update_step`.
        return grads, variables

    def apply(self, grads, trainable_variables=None):
        # Per-step guard: one non-finite gradient poisons them all (see the module docstring);
        # inside the one-launch update where that sees what this one would.
        if not self._guard_in_update():
            grads = _poison_all_if_any_non_finite(grads)
        result = super().apply(grads, trainable_variables)
        self.warn_if_non_finite()
        return result

    def _guard_in_update(self):
        """Whether the per-step guard runs inside the one-launch update
        (:meth:`_backend_update_step`): no ``clipvalue``, which could clip an inf to a
        finite value between :meth:`apply` and the update."""
        return self.clipvalue is None and xla.compiles_apart()

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Where TensorFlow runs the train step without XLA, on one device, the whole
        update (every variable's :meth:`update_step`, the per-step guard) as one
        XLA-compiled launch: one per ALQ layer plus TensorFlow's per-op kernels had made
        a LeNet5 prune-phase step 1.39× an Adam step, 1.10× in one launch (TF CPU,
        8×8 digits, batch 128). Everywhere else Keras' per-variable loop (JAX and
        ``jit_compile`` steps are compiled whole already; torch has no XLA;
        ``tf.distribute`` updates each mirrored variable in its own context)."""
        if not xla.compiles_apart():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        variables = tuple(trainable_variables)
        launches = self.__dict__.setdefault("_one_launch_updates", {})
        key = (tuple(id(v) for v in variables), self._guard_in_update())
        if key not in launches:
            launches[key] = xla.compile_with_xla(self._whole_update(variables, key[1]))
        launches[key](learning_rate, *grads)

    def _whole_update(self, variables, guard):
        def update(learning_rate, *grads):
            if guard:
                grads = _poison_all_if_any_non_finite(grads)
            for gradient, variable in zip(grads, variables):
                self.update_step(gradient, variable, learning_rate)
            return ops.convert_to_tensor(learning_rate)

        return update

    # -- the step ------------------------------------------------------------------
    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        role = self._roles[index]
        if role == "state":
            return
        if role == "statistic":
            self._statistic_update(variable, gradient)
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
        if index == self._count_index:  # once per step: count it, and keep `iterations`
            skipped = ops.where(finite, 0, 1)
            self.assign_add(self._non_finite, skipped)
            self.assign_sub(self.iterations, ops.cast(skipped, self.iterations.dtype))

    def _statistic_update(self, variable, gradient):
        """The variable takes its gradient (the replica sum of one global value each, so
        divided by the replica count) unless the step is skipped (then it is NaN)."""
        value = ops.cast(gradient, variable.dtype) / float(distribute.summed_gradient_replicas())
        self.assign(variable, ops.where(ops.all(ops.isfinite(value)), value,
                                        ops.convert_to_tensor(variable)))

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
        bases_var, alpha_var, mask_var = layer.alq_state()
        slots = (self._weight_m[index], self._weight_v[index], self._weight_vmax[index],
                 self._alpha_m[index], self._alpha_v[index], self._alpha_vmax[index])
        # The bases stay in their storage dtype (int8): cast where they are read.
        state = [ops.convert_to_tensor(v) for v in (bases_var, alpha_var, mask_var, *slots)]
        phase = ops.clip(ops.convert_to_tensor(self._phase), 0, len(PHASES) - 1)
        new = self._layer_step(index)(gradient, finite, lr, t, phase, *state)
        for target, value in zip((bases_var, alpha_var, *slots), new):
            self.assign(target, value)

    def _layer_step(self, index):
        """The step of the layer owning variable ``index``, a pure function of tensors; on
        TensorFlow outside XLA (eager calls aside) compiled by XLA on its own
        (:func:`kquant.xla.compile_with_xla`) unless the one-launch update compiles it."""
        compiled = self.__dict__.setdefault("_compiled_steps", {})
        if index not in compiled:
            compiled[index] = xla.compile_with_xla(self._pure_step(self._owner_layers[index]))
        return compiled[index]

    def _pure_step(self, layer):
        b1, b2, eps, ridge, search = self.beta_1, self.beta_2, self.epsilon, self.ridge, self.search
        l2, to_groups = self.coordinate_l2, layer.layout.to_groups

        def step(gradient, finite, lr, t, phase, bases, alpha, mask, *old):
            g_w = to_groups(gradient)
            m, v, vmax, m_a, v_a, vmax_a = old
            m = b1 * m + (1 - b1) * g_w
            v = b2 * v + (1 - b2) * g_w * g_w
            vmax = ops.maximum(vmax, v)
            g_a = (steps.project(g_w, bases) + l2 * alpha) * mask
            m_a = b1 * m_a + (1 - b1) * g_a
            v_a = b2 * v_a + (1 - b2) * g_a * g_a
            vmax_a = ops.maximum(vmax_a, v_a)
            correction_1, correction_2 = 1 - b1**t, ops.sqrt(1 - b2**t)

            def bases_phase(bases, alpha, m_a):
                g = lr * m / correction_1
                h = (ops.sqrt(vmax) + eps) / correction_2
                return steps.bases_step(bases, alpha, mask, g, h, ridge, moments=(m_a,),
                                        search=search)

            def coordinates_phase(bases, alpha, m_a):
                step = lr * (m_a / correction_1) / (ops.sqrt(vmax_a) / correction_2 + eps)
                return steps.make_positive(bases, (alpha - step) * mask, m_a)

            def prune_phase(bases, alpha, m_a):
                return bases, alpha, m_a

            new_bases, new_alpha, m_a = _by_phase(
                phase, [bases_phase, coordinates_phase, prune_phase], bases, alpha, m_a)
            new = (new_bases, new_alpha, m, v, vmax, m_a, v_a, vmax_a)
            return tuple(ops.where(finite, a, b) for a, b in zip(new, (bases, alpha, *old)))

        return step

    def get_config(self):
        return {
            **super().get_config(),
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "ridge": self.ridge,
            "coordinate_l2": self.coordinate_l2,
            "phase": self.initial_phase,
            "search": self.search,
        }
