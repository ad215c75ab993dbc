"""The STE twin of a model: the same training with the plain STE (Theorems 5.1, 5.2).

"Custom gradient estimators are straight-through estimators in disguise",
Tables 1 and 2: for SGD (with or without momentum) the twin uses the STE
(or a PWL estimator with range ``[M(w_min), M(w_max)]`` where Q̂ vanishes
outside a range), learning rate ``α·η`` *on the quantized kernels* and
initial weights ``M(w₀)``; for adaptive optimizers (Adam and kin) the twin
uses the STE (or PWL with the original range) with the same learning rate and
the same weights.

Keras optimizers have one learning rate for every variable, so the kernels'
``α·η`` is carried by the twin's estimator instead: :class:`ScaledEstimator`
returns ``α·g_z``, and the optimizer keeps ``η``. An SGD step (with momentum)
is linear in the gradient, so this is exactly lr ``α·η`` on the kernels and
``η`` on biases, batch-norm and float layers, which the theorem does not
touch (scaling every variable's lr, as a single optimizer lr would, changes
the training of those). Weight decay, if any, is not scaled.

Only kernel quantizers are switched; input (activation) quantizers are left
as they are, since the theorems cover weight quantizers only.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np

from kquant import estimators
from kquant.analysis.alignment import quantized_layers
from kquant.analysis.equivalence import Equivalence, NotEquivalentError, equivalence
from kquant.estimators.base import Estimator

#: Keras optimizers whose step is (nearly) invariant to a per-coordinate gradient scale.
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW", "Adamax", "Nadam", "RMSprop", "Adagrad", "Adadelta",
                       "Adafactor", "Lion", "Lamb", "Ftrl")
#: Keras optimizers whose step is linear in the gradient.
NON_ADAPTIVE_OPTIMIZERS = ("SGD",)


def is_adaptive(optimizer) -> bool:
    """``True`` for Adam-type optimizers, ``False`` for SGD (with momentum)."""
    for names, answer in ((NON_ADAPTIVE_OPTIMIZERS, False), (ADAPTIVE_OPTIMIZERS, True)):
        for name in names:
            cls = getattr(keras.optimizers, name, None)
            if cls is not None and isinstance(optimizer, cls):
                return answer
    raise ValueError(
        f"Cannot tell whether `optimizer` {type(optimizer).__name__} is adaptive (Adam-type) or "
        "not (SGD-type): pass `adaptive=True` or `adaptive=False`."
    )


@keras.saving.register_keras_serializable(package="kquant")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``factor · schedule(step)``: the STE twin's α-scaled learning-rate schedule."""

    def __init__(self, schedule, factor):
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        if not callable(schedule):
            raise ValueError(f"`schedule` must be a LearningRateSchedule, got {schedule!r}.")
        factor = float(factor)
        if not (factor > 0 and np.isfinite(factor)):
            raise ValueError(f"`factor` must be a positive finite float, got {factor}.")
        self.schedule = schedule
        self.factor = factor

    def __call__(self, step):
        return self.schedule(step) * self.factor

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "factor": self.factor}


def scale_learning_rate(optimizer, factor):
    """A fresh optimizer like ``optimizer`` (same config, no state) with ``lr·factor``."""
    config = optimizer.get_config()
    lr = config["learning_rate"]
    if isinstance(lr, dict):
        lr = ScaledSchedule(keras.optimizers.schedules.deserialize(lr), factor)
    elif factor != 1.0:
        lr = float(lr) * float(factor)
    return type(optimizer).from_config({**config, "learning_rate": lr})


@dataclasses.dataclass
class STETwin:
    """``to_ste``'s result; unpacks as ``model, optimizer = to_ste(...)``."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    alpha: float          # the kernels' lr factor (1 if adaptive; NaN if layers differ)
    adaptive: bool
    equivalences: dict[str, Equivalence]      # layer name -> α and M of its kernel quantizer

    def __iter__(self):
        return iter((self.model, self.optimizer))


def _check_hard_forward(estimator: Estimator, layer_name):
    overrides_step = type(estimator).step is not Estimator.step
    if overrides_step and getattr(estimator, "soft_forward", True):
        raise NotEquivalentError(
            f"Layer {layer_name!r}: estimator {estimator!r} changes the forward pass (soft "
            "forward), so the Q̂ net is not a quantized net the STE twin can follow."
        )


@keras.saving.register_keras_serializable(package="kquant")
class ScaledEstimator(Estimator):
    """``g_z = scale · inner(g_q)``: the SGD twin's kernels-only learning-rate factor α."""

    def __init__(self, inner="ste", scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.inner = estimators.get(inner)
        scale = float(scale)
        if not (scale > 0 and np.isfinite(scale)):
            raise ValueError(f"`scale` must be a positive finite float, got {scale}.")
        self.scale = scale

    def build(self, input_shape=None):
        if not self.inner.built:
            self.inner.build(input_shape)
        self.built = True

    def context(self, z, q, staircase, x=None, training=None):
        return self.inner.context(z, q, staircase, x=x, training=training)

    def gradient(self, upstream, ctx):
        return self.scale * self.inner.gradient(upstream, ctx)

    def get_config(self):
        return {"inner": estimators.serialize(self.inner), "scale": self.scale}


def _twin_estimator(eq: Equivalence, adaptive: bool):
    if not adaptive:
        return ScaledEstimator(eq.twin_estimator(), scale=eq.alpha)
    lo, hi = eq.lower_cutoff, eq.upper_cutoff
    if lo is None and hi is None:
        return estimators.get("ste")
    if lo != hi:
        raise NotEquivalentError(
            f"The PWL twin needs the clip range s ∈ [−{lo}, {hi}] (None: unbounded), which the "
            "symmetric clipped_ste cannot express."
        )
    return estimators.get("clipped_ste", clip=hi)


def to_ste(model, optimizer, adaptive=None) -> STETwin:
    """The STE twin of ``model`` trained with ``optimizer``, ready to compile and train.

    SGD-type: kernels mapped by M, estimator → STE/PWL with its gradient × α
    (:class:`ScaledEstimator`: lr ``α·η`` on the kernels only; the optimizer
    keeps ``η`` for every other variable). Adam-type
    (``adaptive=True``, detected by :func:`is_adaptive`): weights and
    learning rate unchanged, estimator → STE/PWL. The twin's optimizer is a
    fresh copy of ``optimizer``'s config (no state).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"`optimizer` must be a keras optimizer, got {type(optimizer).__name__}.")
    adaptive = is_adaptive(optimizer) if adaptive is None else bool(adaptive)
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("`model` has no layer with a kernel quantizer: nothing to turn into STE.")
    if optimizer.built and int(keras.ops.convert_to_numpy(optimizer.iterations)) > 0:
        warnings.warn("to_ste: the twin gets a fresh optimizer; the state of `optimizer` "
                      "(momentum, moments) is not carried over.", RuntimeWarning, stacklevel=2)

    plans = {}
    for layer in layers:
        quantizer = layer.kernel_quantizer
        _check_hard_forward(quantizer.estimator, layer.name)
        eq = equivalence(quantizer=quantizer)
        plans[layer.name] = (eq, _twin_estimator(eq, adaptive))
    alphas = {name: eq.alpha for name, (eq, _) in plans.items()}
    alpha = 1.0
    if not adaptive:  # per layer in its estimator; reported as one number when they agree
        values = np.array(list(alphas.values()))
        alpha = float(values.mean()) if np.ptp(values) <= 1e-6 * values.max() else float("nan")

    def clone(layer):
        config = layer.get_config()
        if layer.name in plans:
            twin_estimator = estimators.serialize(plans[layer.name][1])
            kq = dict(config["kernel_quantizer"])
            kq["config"] = {**kq.get("config", {}), "estimator": twin_estimator}
            config["kernel_quantizer"] = kq
        return layer.__class__.from_config(config)

    twin = keras.models.clone_model(model, clone_function=clone)
    _copy_weights(model, twin, plans, adaptive)
    return STETwin(
        model=twin,
        optimizer=scale_learning_rate(optimizer, 1.0),
        alpha=alpha,
        adaptive=adaptive,
        equivalences={name: eq for name, (eq, _) in plans.items()},
    )


def _all_layers(model):
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(_all_layers(layer))
    return out


def _copy_weights(model, twin, plans, adaptive):
    def weighted(m):
        return [l for l in _all_layers(m) if l.weights and not isinstance(l, keras.Model)]

    old_layers, new_layers = weighted(model), weighted(twin)
    if [l.name for l in old_layers] != [l.name for l in new_layers]:
        raise RuntimeError("to_ste: the cloned model's layers do not match the original's.")
    for old, new in zip(old_layers, new_layers):
        old_estimator_vars = set()
        if old.name in plans:
            old_estimator_vars = {id(v) for v in old.kernel_quantizer.estimator.weights}
        old_vars = [v for v in old.weights if id(v) not in old_estimator_vars]
        new_vars = list(new.weights)
        if len(old_vars) != len(new_vars):
            raise RuntimeError(f"to_ste: layer {old.name!r} has {len(old_vars)} variables to copy "
                               f"but its twin has {len(new_vars)}.")
        kernel = old.latent_kernel if old.name in plans else None
        for ov, nv in zip(old_vars, new_vars):
            if tuple(ov.shape) != tuple(nv.shape):
                raise RuntimeError(f"to_ste: variable {ov.path} does not match {nv.path}.")
            value = keras.ops.convert_to_numpy(ov)
            if ov is kernel and not adaptive:
                value = plans[old.name][0](value).astype(value.dtype)
            nv.assign(value)
