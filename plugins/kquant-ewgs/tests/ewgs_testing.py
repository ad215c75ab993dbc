"""Backend seam for the tests: gradients of a scalar function (TF tape / jax.grad)."""

import keras
import numpy as np
from keras import StatelessScope, ops


def grad(fn, *inputs):
    """``[∂fn/∂input, ...]`` as NumPy arrays."""
    xs = [ops.convert_to_tensor(np.asarray(x, "float32")) for x in inputs]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(xs)
            value = fn(*xs)
        grads = tape.gradient(value, xs)
    else:
        import jax

        grads = jax.grad(lambda *a: fn(*a), argnums=tuple(range(len(xs))))(*xs)
    return [np.zeros(np.shape(x)) if g is None else ops.convert_to_numpy(g) for x, g in zip(xs, grads)]


def variable_grads(variables, loss_fn):
    """Gradients of ``loss_fn()`` w.r.t. ``variables`` (NumPy list)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return [ops.convert_to_numpy(g) for g in tape.gradient(loss, variables)]
    import jax

    def f(vals):
        with StatelessScope(state_mapping=list(zip(variables, vals))):
            return loss_fn()

    return [np.asarray(g) for g in jax.grad(f)([v.value for v in variables])]
