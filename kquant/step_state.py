"""Running statistics that change only when the optimizer applies the step.

A running statistic estimated in the forward pass (ALQ's activation ``x_ref``,
``γ``) must move with the training step: a step the optimizer skips (a NaN/inf
gradient under :class:`~kquant.optimizers.ALQ`'s per-step guard,
:class:`~kquant.optimizers.SkipNonFinite` or Keras' ``LossScaleOptimizer``,
e.g. a NaN label or sample weight behind finite activations) must leave it as
it was. Written in the forward pass, it cannot know that decision.

Keras 3 has the mechanism (float8 training keeps its scales so): a trainable
variable with ``overwrite_with_gradient=True`` is *assigned its gradient* by
every Keras optimizer instead of being updated (no learning rate, clipping,
weight decay or loss-scale division). :func:`commit` is the identity on the
layer's outputs whose custom gradient hands each such variable its new value,
so the write happens inside the optimizer's apply, under its guard, on every
backend (TF, JAX's stateless step, torch), under ``jit_compile`` and
``tf.distribute`` (each replica's gradient is the already all-reduced global
statistic). Inference calls and frozen layers (``trainable=False``) never
write. A layer must call :func:`commit` once per step on a given variable
(two calls would sum their gradients). :func:`initialize_once` builds
data-initialised state (LSQ's step, EWGS's interval) on it.
"""

from __future__ import annotations

from keras import ops


def add_statistic(layer, name, shape, initializer):
    """A float32 variable of ``layer`` written only through :func:`commit`."""
    return layer.add_weight(name=name, shape=shape, initializer=initializer, dtype="float32",
                            trainable=True, autocast=False, overwrite_with_gradient=True)


def is_statistic(variable) -> bool:
    """Whether the optimizer must assign ``variable`` its gradient (Keras' flag)."""
    return bool(getattr(variable, "overwrite_with_gradient", False))


def commit(outputs, variables, values):
    """``outputs`` unchanged; the gradient of ``variables[i]`` becomes ``values[i]``.

    ``values`` are the statistics the step should leave (already global over
    replicas, already guarded: pass the old value where the new one is not
    finite); no gradient flows into them or out of the variables otherwise.
    """
    n = len(variables)
    old = [ops.convert_to_tensor(v) for v in variables]   # the read autodiff ties to the variable
    new = [ops.stop_gradient(ops.cast(v, o.dtype)) for v, o in zip(values, old)]

    @ops.custom_gradient
    def identity(x, *state):
        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            return (upstream, *state[n:], *[ops.zeros_like(s) for s in state[n:]])

        return ops.copy(x), grad

    return identity(outputs, *old, *new)


def is_initialized(initialized):
    """Scalar bool: the 0/1 statistic ``initialized`` of :func:`initialize_once` is set."""
    return ops.stop_gradient(ops.convert_to_tensor(initialized)) > 0


def initialize_once(initialized, pairs, training=None, valid=None):
    """Data-initialised state, stored from the first *finite* training step applied.

    ``pairs`` is a list of ``(variable, estimate)`` (statistics of
    :func:`add_statistic`); each estimate must already be a global statistic
    (e.g. :func:`kquant.distribute.global_mean`). Returns ``(values, commit)``:
    the values to use now (the stored ones once ``initialized``, a 0/1
    statistic, is set, else the fresh estimates; no gradient flows into them)
    and ``commit(outputs)``, the identity on a tensor of the layer's output
    path that hands the optimizer the new state (call it once per step; the
    identity when not training). The optimizer stores the estimates and sets
    the flag when the call is a training call, every estimate is finite,
    ``valid`` (a scalar bool) holds and the optimizer applies the step; a
    NaN/inf batch, a skipped step (even one whose NaN this layer never saw) or
    an inference call leaves the state as it was. No Python branching on
    tensors: works under ``jit_compile``, ``tf.distribute`` and JAX tracing.
    """
    done = is_initialized(initialized)
    stored = [ops.stop_gradient(ops.convert_to_tensor(v)) for v, _ in pairs]
    values = [ops.stop_gradient(ops.where(done, ops.cast(old, e.dtype), e))
              for old, (_, e) in zip(stored, pairs)]
    if training is None or training is False:
        return values, lambda outputs: outputs
    take = ops.all(ops.stack([ops.all(ops.isfinite(e)) for _, e in pairs]))
    if valid is not None:
        take = ops.logical_and(take, valid)
    if training is not True:
        take = ops.logical_and(take, ops.cast(training, "bool"))
    take = ops.logical_and(ops.logical_not(done), take)
    new = [ops.where(take, ops.cast(e, old.dtype), old) for old, (_, e) in zip(stored, pairs)]
    flag = ops.cast(ops.logical_or(done, take), "float32")
    variables = [v for v, _ in pairs] + [initialized]

    def write(outputs):
        return commit(outputs, variables, [*new, flag])

    return values, write
