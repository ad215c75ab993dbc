"""Backend seam for tests: gradients of a scalar function of tensors/variables."""

import keras
import numpy as np
from keras import ops


def grad(fn, *inputs):
    """``(value, [∂fn/∂input, ...])`` as NumPy, on the active backend."""
    backend = keras.backend.backend()
    xs = [ops.convert_to_tensor(np.asarray(x, "float32")) for x in inputs]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for x in xs:
                tape.watch(x)
            value = fn(*xs)
        grads = tape.gradient(value, xs)
    elif backend == "jax":
        import jax

        value, grads = jax.value_and_grad(lambda *a: fn(*a), argnums=tuple(range(len(xs))))(*xs)
    elif backend == "torch":
        import torch

        xs = [x.detach().requires_grad_(True) for x in xs]
        value = fn(*xs)
        grads = torch.autograd.grad(value, xs, allow_unused=True)
    else:  # pragma: no cover
        raise NotImplementedError(backend)
    return ops.convert_to_numpy(value), [
        np.zeros(np.shape(x)) if g is None else ops.convert_to_numpy(g) for x, g in zip(xs, grads)
    ]


def variable_grads(model_or_layer, loss_fn):
    """Gradients of ``loss_fn()`` w.r.t. the trainable variables (NumPy list)."""
    backend = keras.backend.backend()
    variables = model_or_layer.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, variables)
        return [None if g is None else ops.convert_to_numpy(g) for g in grads]
    if backend == "jax":
        import jax
        from keras import StatelessScope

        values = [v.value for v in variables]

        def f(vals):
            with StatelessScope(state_mapping=list(zip(variables, vals))):
                return loss_fn()

        return [np.asarray(g) for g in jax.grad(f)(values)]
    raise NotImplementedError(backend)
