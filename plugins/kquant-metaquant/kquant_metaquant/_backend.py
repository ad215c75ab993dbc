"""The backend-specific seam of MetaQuant: value and gradient of a pure function,
the cross-replica sum of gradients under ``tf.distribute``, whether a model trains
under a strategy, and XLA compilation of a function."""

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


def replicas() -> int:
    """Replicas in sync in the current ``tf.distribute`` replica context (else 1).

    On JAX ``DataParallel`` the batch is one global array: gradients are global already.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            return int(tf.distribute.get_replica_context().num_replicas_in_sync)
    return 1


def in_strategy(model) -> bool:
    """Whether ``model`` trains under a ``tf.distribute`` strategy (``False`` off TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy() or getattr(model, "_distribute_strategy", None) is not None


def replica_sum(tensors):
    """All-reduce (sum) a list of per-replica gradients, as Keras does for its own
    step (the per-replica loss is already scaled by 1/replicas); identity on one replica."""
    tensors = list(tensors)
    if replicas() > 1 and tensors:
        import tensorflow as tf

        return list(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tensors))
    return tensors


def xla(fn):
    """``fn`` compiled with XLA: ``tf.function(jit_compile=True)`` / ``jax.jit``."""
    if check_backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    import jax

    return jax.jit(fn)
