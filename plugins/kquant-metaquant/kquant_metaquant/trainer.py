"""``MetaQuant``: the train step that trains the shared meta network φ.

Wrap a model whose kernel quantizers use a MetaQuant estimator::

    model = kquant_metaquant.MetaQuant(quantized_model)      # shares one M_φ
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=..., metrics=[...])
    model.fit(x, y)

One train step ``t`` (Chen et al. 2019, Eq. 6–8 and Alg. 1; "late weight update"):

1. ``g_W̃ = M_φ(g_Ŵ^{t−1}, W̃^{t−1})`` for every meta-quantized kernel (one
   shared ``M_φ``), ``g_W = calibrate(g_W̃)`` (``∂W̃/∂W``, see
   :mod:`kquant_metaquant.calibration`).
2. The compiled optimizer π turns the pending gradients into the new weights
   ``W^t = W^{t−1} − α·π(g_W)``; every other trainable variable (biases, float
   layers, BN) gets its own gradient of step ``t−1`` the same way, so the whole
   model moves together and, with an identity ``M``, exactly as with STE.
3. The forward pass uses ``W^t`` written as
   ``stop_grad(W^t) − α·(g_W − stop_grad(g_W))``: the value of the applied
   step with a gradient path to φ (π's own Jacobian treated as identity, the
   paper's ``π(g) = g + residual``, as in the authors' code).
4. The backward pass gives ``∂ℓ/∂φ`` (applied by a meta Adam, lr 1e-3 as in
   the paper), the new ``g_Ŵ`` of every meta kernel (saved in its estimator)
   and the new gradients of the other variables (saved until the next step).

Step 0 has no ``g_Ŵ`` yet: it only records gradients and updates nothing. A batch
whose gradients are not all finite leaves every variable as it was (see ``late_update``).
The whole step is a pure function of the variable values (``stateless_call``,
``optimizer.stateless_apply``), so it runs unchanged on TensorFlow and JAX;
the backend-specific pieces are in :mod:`kquant_metaquant._backend` (chiefly
:func:`~kquant_metaquant._backend.backend_value_and_grad`).
The stored variables always hold the weights used by the last forward pass;
the last recorded gradients are applied by the next step.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
from keras import ops

from kquant.distribute import all_finite
from kquant_metaquant._backend import (
    backend_value_and_grad,
    check_backend,
    in_strategy,
    replica_sum,
    replicas,
)
from kquant_metaquant.calibration import meta_view
from kquant_metaquant.estimators import MetaQuantEstimator
from kquant_metaquant.meta_networks import MetaNetwork, build_meta_network

_BETA_1, _BETA_2, _EPSILON = 0.9, 0.999, 1e-8


@dataclasses.dataclass
class _MetaKernel:
    layer: object
    kernel: object
    estimator: MetaQuantEstimator
    view: object


def find_meta_kernels(model):
    """``_MetaKernel`` entries for every layer whose kernel quantizer uses MetaQuant."""
    found, owners = [], {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        quantizer = getattr(layer, "kernel_quantizer", None)
        if quantizer is not None and isinstance(quantizer.estimator, MetaQuantEstimator):
            if not quantizer.estimator.built:
                raise ValueError(f"Layer {layer.name!r} is not built; build the model first.")
            other = owners.setdefault(id(quantizer.estimator), layer.name)
            if other != layer.name:
                raise ValueError(
                    f"Layers {other!r} and {layer.name!r} share one MetaQuant estimator instance, "
                    "but it keeps per-layer state: give each quantizer its own (pass the "
                    "estimator by name or as a kquant.estimators.serialize dict)."
                )
            found.append(_MetaKernel(layer, layer.latent_kernel, quantizer.estimator,
                                     meta_view(quantizer)))
    return found


def _read(variable):
    """A snapshot of a variable's value (on TensorFlow ``.value`` is the live variable)."""
    return ops.copy(variable.value)


def _finite(x):
    return ops.where(ops.isfinite(x), x, ops.zeros_like(x))


def _all_finite(tensors):
    """Whether every element of every tensor is finite (a boolean scalar)."""
    flags = [all_finite(t) for t in tensors]
    return ops.all(ops.stack(flags)) if flags else ops.convert_to_tensor(True)


def _warn_if_cannot_descend(meta_network, kernels):
    """MultiFC with a bias-free linear stack is ``c·g·W̃``: with signed W̃ (BWN/sign)
    about half the coordinates move uphill every step, whatever φ learns."""
    from kquant_metaquant.calibration import DoReFaView
    from kquant_metaquant.meta_networks import MultiFCNetwork

    if not (isinstance(meta_network, MultiFCNetwork) and meta_network.collapses_to_scalar):
        return
    signed = [k.layer.name for k in kernels if not isinstance(k.view, DoReFaView)]
    if signed:
        warnings.warn(
            "MetaQuant MultiFC with the paper's bias-free linear FC stack computes "
            "g_W = c·g·W̃ (c a scalar), and with the signed W̃ = W of BWN/sign (layers "
            f"{signed}) about half of the coordinates are pushed uphill every step: it cannot "
            "descend. Use estimator=kquant.estimators.get('multifc', use_bias=True) "
            "(FC biases, M starts at ≈ g) or a DoReFa kernel quantizer.",
            UserWarning, stacklevel=3)


def _warn_if_starts_uphill(meta_network, kernels):
    """A linear FC stack is ``c·x + d``; FCGrad (``c·g + d``) and MultiFC on DoReFa's
    ``W̃ ∈ [0, 1]`` (``g·(c·W̃ + d)``) point uphill at the start when the random draw
    gave ``c ≤ 0`` and no bias term rescues it: every kernel climbs the loss until the
    meta optimizer flips ``c``."""
    from kquant_metaquant.calibration import DoReFaView
    from kquant_metaquant.meta_networks import FCGradNetwork, MultiFCNetwork

    if meta_network.use_bias:
        return
    c = meta_network.linear_scale()
    if c is None or c > 0:
        return
    if isinstance(meta_network, MultiFCNetwork):
        if not all(isinstance(k.view, DoReFaView) for k in kernels):
            return      # signed W̃: _warn_if_cannot_descend said it
        what = "g_W̃ = c·g·W̃ (W̃ ≥ 0)"
    elif isinstance(meta_network, FCGradNetwork):
        what = "g_W̃ = c·g"
    else:
        return
    warnings.warn(
        f"MetaQuant {type(meta_network).__name__}: its randomly initialised linear FC stack "
        f"starts with c = Π kernels = {c:.3g} ≤ 0, so {what} points uphill: every kernel "
        "climbs the loss until the meta optimizer flips the sign of c (random init, as in the "
        "paper and the authors' code). Use init='identity' (the authors' symmetric_init: "
        "M starts as the identity, i.e. STE), e.g. "
        "kquant.estimators.get('fcgrad', init='identity'), or another seed.",
        UserWarning, stacklevel=3)


@keras.saving.register_keras_serializable(package="kquant_metaquant")
class MetaQuant(keras.Model):
    """Wraps a kquant model and trains it with MetaQuant's late weight update.

    Args:
        model: a built Keras model with at least one kernel quantizer whose
            estimator is ``metaquant``/``fcgrad``/``multifc``/``lstmfc``.
        meta_learning_rate: Adam learning rate of φ (paper: 1e-3).
        meta_network: a :class:`~kquant_metaquant.meta_networks.MetaNetwork`
            to share (default: built from the estimators' ``meta_spec``).
    """

    def __init__(self, model, meta_learning_rate=1e-3, meta_network=None, **kwargs):
        super().__init__(**kwargs)
        check_backend()
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ValueError("`model` must be built (give it an Input or call it once).")
        meta_learning_rate = float(meta_learning_rate)
        if not meta_learning_rate >= 0:
            raise ValueError(f"`meta_learning_rate` must be >= 0, got {meta_learning_rate}.")
        kernels = find_meta_kernels(model)
        if not kernels:
            raise ValueError(
                "`model` has no kernel quantizer with a MetaQuant estimator "
                "(estimator='metaquant', 'fcgrad', 'multifc' or 'lstmfc')."
            )
        specs = {str(k.estimator.meta_spec()): k for k in kernels}
        if len(specs) > 1:
            raise ValueError(
                "The meta network is shared by all layers, so their MetaQuant estimators must "
                "agree; got " + "; ".join(f"{k.layer.name}: {s}" for s, k in specs.items()) + "."
            )
        spec = kernels[0].estimator.meta_spec()
        restoring = isinstance(meta_network, dict)   # from_config: trained weights load next
        if isinstance(meta_network, dict):
            meta_network = keras.saving.deserialize_keras_object(meta_network)
        if meta_network is None:
            meta_network = build_meta_network(spec["kind"], spec["hidden"], spec["num_layers"],
                                              spec["activation"], use_bias=spec["use_bias"],
                                              init=spec["init"])
        if not isinstance(meta_network, MetaNetwork):
            raise TypeError("`meta_network` must be a kquant_metaquant MetaNetwork, got "
                            f"{type(meta_network).__name__}.")
        if not meta_network.built:
            meta_network.build()
        for k in kernels:
            if (meta_network.state_count != k.estimator._state_count
                    or (meta_network.state_count and meta_network.state_width != k.estimator.hidden)):
                raise ValueError(
                    f"`meta_network` {type(meta_network).__name__} does not match the state kept by "
                    f"the estimator of layer {k.layer.name!r} ({k.estimator.meta_spec()})."
                )
        _warn_if_cannot_descend(meta_network, kernels)
        if not restoring:
            _warn_if_starts_uphill(meta_network, kernels)
        self.model = model
        self.meta_network = meta_network
        self.meta_learning_rate = meta_learning_rate
        self._kernels = kernels
        kernel_ids = {id(k.kernel) for k in kernels}
        self.meta_step = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                         trainable=False, name="meta_step")
        self.meta_gradient_norm = self.add_weight(shape=(), initializer="zeros",
                                                  trainable=False, name="meta_gradient_norm")
        # Gradients of the non-meta trainable variables, applied one step late.
        self._pending = {}
        for i, v in enumerate(model.trainable_variables):
            if id(v) not in kernel_ids:
                self._pending[id(v)] = self.add_weight(
                    shape=v.shape, initializer="zeros", trainable=False, name=f"pending_gradient_{i}")
        # Meta Adam moments, kept as model state so the step stays a pure function.
        self._meta_moments = {}
        for i, v in enumerate(meta_network.weights):
            self._meta_moments[id(v)] = (
                self.add_weight(shape=v.shape, initializer="zeros", trainable=False,
                                name=f"meta_adam_m_{i}"),
                self.add_weight(shape=v.shape, initializer="zeros", trainable=False,
                                name=f"meta_adam_v_{i}"),
            )
        self.built = True

    # -- Keras model ------------------------------------------------------------
    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def get_config(self):
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "meta_learning_rate": self.meta_learning_rate,
            "meta_network": keras.saving.serialize_keras_object(self.meta_network),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- the late weight update ---------------------------------------------------
    def _plan(self):
        optimizer = self.optimizer
        if type(optimizer).__name__ == "LossScaleOptimizer":
            raise ValueError("MetaQuant does not support LossScaleOptimizer (mixed precision).")
        if getattr(optimizer, "gradient_accumulation_steps", None):
            raise ValueError("MetaQuant does not support `gradient_accumulation_steps`.")
        tpos = {id(v): i for i, v in enumerate(self.trainable_variables)}
        npos = {id(v): i for i, v in enumerate(self.non_trainable_variables)}
        kernels = [
            (k, tpos[id(k.kernel)], npos[id(k.estimator.previous_gradient)],
             [npos[id(s)] for s in k.estimator.meta_state])
            for k in self._kernels if id(k.kernel) in tpos
        ]
        kernel_t = {t for _, t, _, _ in kernels}
        phi_ids = {id(v) for v in self.meta_network.weights}
        phi = [(tpos[id(v)], npos[id(self._meta_moments[id(v)][0])],
                npos[id(self._meta_moments[id(v)][1])])
               for v in self.meta_network.trainable_weights if id(v) in tpos]
        others = []
        for v in self.trainable_variables:
            i = tpos[id(v)]
            if i in kernel_t or id(v) in phi_ids:
                continue
            if id(v) not in self._pending:
                raise ValueError(f"Variable {v.path!r} was not trainable when MetaQuant was built.")
            others.append((i, npos[id(self._pending[id(v)])]))
        return kernels, phi, others, npos[id(self.meta_step)], npos[id(self.meta_gradient_norm)]

    def _current_learning_rate(self, optimizer_values):
        mapping = list(zip(self.optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            return ops.convert_to_tensor(self.optimizer.learning_rate, "float32")

    def _apply_optimizer(self, optimizer_values, grads, trainable, active):
        """π: the compiled optimizer's step on values, skipped where ``active`` is false.

        JAX: ``optimizer.stateless_apply``. TensorFlow has no stateless apply (it
        clashes with tf.distribute), so the optimizer updates its variables in
        place and the step-0 case is undone by writing the old values back.
        """
        if keras.backend.backend() == "jax":
            new_T, new_O = self.optimizer.stateless_apply(optimizer_values, grads, trainable)
        else:
            # The pending gradients are global already (summed over replicas after the
            # backward); the optimizer sums them over replicas once more: divide first.
            r = replicas()
            if r > 1:
                grads = [g / float(r) for g in grads]
            self.optimizer.apply(grads, self.trainable_variables)
            new_T = [_read(v) for v in self.trainable_variables]
            new_O = [_read(v) for v in self.optimizer.variables]
        new_T = [ops.where(active, a, b) for a, b in zip(new_T, trainable)]
        new_O = [ops.where(active, a, b) for a, b in zip(new_O, optimizer_values)]
        if keras.backend.backend() != "jax":
            for v, value in zip(self.trainable_variables, new_T):
                v.assign(value)
            for v, value in zip(self.optimizer.variables, new_O):
                v.assign(value)
        return new_T, new_O

    def late_update(self, trainable, non_trainable, optimizer_values, metrics_values,
                    x, y=None, sample_weight=None):
        """One MetaQuant step on variable values (pure). Returns
        ``loss, y_pred, trainable, non_trainable, optimizer_values, metrics_values``."""
        kernels, phi, others, step_i, norm_i = self._plan()
        T, N, O = list(trainable), list(non_trainable), list(optimizer_values)
        active = N[step_i] > 0
        lr = ops.where(active, self._current_learning_rate(O), 0.0)
        t_vars, n_vars = self.trainable_variables, self.non_trainable_variables

        def forward(phi_values, kernel_probes, other_probes):
            T_phi = list(T)
            for (i, _, _), value in zip(phi, phi_values):
                T_phi[i] = value
            mapping = list(zip(t_vars, T_phi)) + list(zip(n_vars, N))
            meta_grads, states = [], []
            with keras.StatelessScope(state_mapping=mapping):
                for k, ti, gi, si in kernels:
                    w = ops.stop_gradient(T[ti])
                    soft = ops.stop_gradient(k.view.soft(w))
                    m, state = self.meta_network.meta_gradient(
                        ops.reshape(N[gi], (-1,)), ops.reshape(soft, (-1,)),
                        tuple(N[j] for j in si))
                    meta_grads.append(k.view.calibrate(w, ops.reshape(m, ops.shape(w))))
                    states.append(state)
            grads = [ops.zeros_like(v) for v in T]
            for (_, ti, _, _), g in zip(kernels, meta_grads):
                grads[ti] = _finite(ops.stop_gradient(g))
            for ti, pi in others:
                grads[ti] = N[pi]
            new_T, new_O = self._apply_optimizer(O, grads, T, active)
            run_T = list(new_T)
            for (_, ti, _, _), g in zip(kernels, meta_grads):
                run_T[ti] = new_T[ti] - ops.cast(lr, g.dtype) * (g - ops.stop_gradient(g))
            for (ti, _), probe in zip(others, other_probes):
                run_T[ti] = new_T[ti] + probe
            for (i, _, _), value in zip(phi, phi_values):
                run_T[i] = value
            for (k, _, _, _), probe in zip(kernels, kernel_probes):
                k.estimator._gradient_probe = probe
            try:
                y_pred, N_after, losses = self.stateless_call(
                    run_T, N, x, training=True, return_losses=True)
            finally:
                for k, _, _, _ in kernels:
                    k.estimator._gradient_probe = None
            if losses:
                self._losses_override.clear()
                self._losses_override = losses
            loss, (_, N_after, M_after) = self.stateless_compute_loss(
                run_T, N_after, metrics_values, x=x, y=y, y_pred=y_pred,
                sample_weight=sample_weight, training=True)
            if losses:
                self._losses_override.clear()
            return loss, (y_pred, new_T, new_O, list(N_after), list(M_after), states)

        args = ([T[i] for i, _, _ in phi],
                [ops.zeros_like(T[ti]) for _, ti, _, _ in kernels],
                [ops.zeros_like(T[ti]) for ti, _ in others])
        (loss, aux), (g_phi, g_kernels, g_others) = backend_value_and_grad(forward, args)
        y_pred, new_T, new_O, new_N, new_M, states = aux
        # Under tf.distribute: the global batch's gradients on every replica, so that the
        # stored g_Ŵ, the pending gradients and φ's update are the one-device ones.
        n_phi, n_k = len(g_phi), len(g_kernels)
        reduced = replica_sum([*g_phi, *g_kernels, *g_others])
        g_phi, g_kernels, g_others = reduced[:n_phi], reduced[n_phi:n_phi + n_k], reduced[n_phi + n_k:]

        for (k, ti, gi, si), g_q, state in zip(kernels, g_kernels, states):
            # g_Ŵ = g_q / (∂Ŵ/∂q); the LSTM state advances only on real updates.
            new_N[gi] = _finite(g_q / k.view.output_slope(new_T[ti]))
            for j, s in zip(si, state):
                new_N[j] = ops.where(active, s, N[j])
        for (ti, pi), g in zip(others, g_others):
            new_N[pi] = _finite(g)

        if phi:
            squares = [ops.sum(ops.square(g)) for g in g_phi]
            norm = ops.sqrt(sum(squares[1:], squares[0]))
            ok = ops.logical_and(active, ops.isfinite(norm))
            step = ops.cast(N[step_i], "float32")
            for (ti, mi, vi), g in zip(phi, g_phi):
                g = _finite(g)
                m = _BETA_1 * N[mi] + (1.0 - _BETA_1) * g
                v = _BETA_2 * N[vi] + (1.0 - _BETA_2) * g * g
                m_hat = m / (1.0 - ops.power(_BETA_1, ops.maximum(step, 1.0)))
                v_hat = v / (1.0 - ops.power(_BETA_2, ops.maximum(step, 1.0)))
                update = self.meta_learning_rate * m_hat / (ops.sqrt(v_hat) + _EPSILON)
                new_T[ti] = ops.where(ok, T[ti] - update, T[ti])
                new_N[mi] = ops.where(ok, m, N[mi])
                new_N[vi] = ops.where(ok, v, N[vi])
            new_N[norm_i] = _finite(norm)
        new_N[step_i] = N[step_i] + 1
        # A batch whose global gradients are not all finite (a NaN sample, an overflow) is
        # a step that never happened: no weight, φ, moment, state, pending gradient or
        # optimizer value is written (the same decision on every replica: the gradients
        # are summed over them); the metrics still see its loss.
        finite = _all_finite([*g_phi, *g_kernels, *g_others])
        new_T = [ops.where(finite, a, b) for a, b in zip(new_T, T)]
        new_N = [ops.where(finite, a, b) for a, b in zip(new_N, N)]
        new_O = [ops.where(finite, a, b) for a, b in zip(new_O, O)]
        return loss, y_pred, new_T, new_N, new_O, new_M

    def compile(self, *args, jit_compile="auto", **kwargs):
        """``keras.Model.compile``; ``jit_compile="auto"`` is Keras' own choice, the one its
        STE twin gets, except for a meta network that :attr:`~MetaNetwork.prefers_xla`
        (LSTMFC): XLA on TensorFlow too.

        Keras' ``"auto"`` leaves a CPU-only TensorFlow without XLA, whose convolutions
        run faster than XLA:CPU's (small convnet, 2 cores: STE 1.36× slower with XLA).
        FCGrad and MultiFC add O(n) work, so they keep it (FCGrad 1.36× → 1.13× an STE
        step). LSTMFC's ``[n, 4h]`` element-wise passes around its two matrix products
        gain more from XLA's fusion (5.3× → 4.2–4.5× an STE step). Not under a
        ``tf.distribute`` strategy (``MirroredStrategy`` cannot compile with XLA) nor
        with ``run_eagerly``.
        """
        if (jit_compile == "auto" and keras.backend.backend() == "tensorflow"
                and self.meta_network.prefers_xla
                and not kwargs.get("run_eagerly") and not in_strategy(self)):
            jit_compile = True
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def compile_from_config(self, config):
        """Re-compile a loaded model (Keras' own skips a model whose ``compile`` is custom);
        the optimizer is built so that its saved state loads next."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    # -- backend train steps --------------------------------------------------------
    def train_step(self, *args):
        if keras.backend.backend() == "jax":
            return self._train_step_jax(*args)
        return self._train_step_tensorflow(*args)

    def _train_step_tensorflow(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        groups = (self.trainable_variables, self.non_trainable_variables,
                  self.optimizer.variables, self.metrics_variables)
        values = [[_read(v) for v in group] for group in groups]
        loss, y_pred, *new_values = self.late_update(*values, x, y, sample_weight)
        for group, new in zip(groups, new_values):
            for v, value in zip(group, new):
                v.assign(value)
        batch = ops.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]
        self._loss_tracker.update_state(loss, sample_weight=batch)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _train_step_jax(self, state, data):
        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss, y_pred, trainable, non_trainable, optimizer_values, metrics_values = self.late_update(
            trainable, non_trainable, optimizer_values, metrics_values, x, y, sample_weight)
        logs, metrics_values = self._update_metrics_variables(
            metrics_values, loss, x, y, y_pred, sample_weight)
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)
