"""The one backend-specific seam of MetaQuant: value and gradient of a pure function."""

from __future__ import annotations

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def check_backend():
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"MetaQuant's train step supports the {' and '.join(SUPPORTED_BACKENDS)} backends, "
            f"not {backend!r}: it needs a gradient of a pure function of the variable values "
            "(GradientTape on TensorFlow, jax.value_and_grad on JAX)."
        )
    return backend


def backend_value_and_grad(fn, args):
    """``(value, aux), grads`` of ``value, aux = fn(*args)`` w.r.t. ``args`` (nested lists)."""
    backend = check_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(args))
            value, aux = fn(*args)
        grads = tape.gradient(value, list(args),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return (value, aux), grads
    import jax

    return jax.value_and_grad(fn, argnums=tuple(range(len(args))), has_aux=True)(*args)
