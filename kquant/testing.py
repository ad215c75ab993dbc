"""Test helpers for kquant and its plugins: gradients on the active backend.

The one backend seam tests need (TF ``GradientTape``, ``jax.grad`` with a
``StatelessScope`` for variables, ``torch.autograd.grad``), so estimator
tests — ours and third-party plugins' — are written once for every backend::

    from kquant.testing import grad
    _, (g,) = grad(lambda w: ops.sum(ops.multiply(quantizer(w), upstream)), w)
"""

from __future__ import annotations

import keras
import numpy as np
from keras import StatelessScope, ops


def grad(fn, *inputs):
    """``(value, [∂fn/∂input, ...])`` as NumPy for a scalar ``fn`` of tensors.

    Inputs are converted to float32 tensors; an input ``fn`` does not use gets
    a zero gradient.
    """
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
        value = value.detach()
    else:  # pragma: no cover
        raise NotImplementedError(f"kquant.testing.grad: backend {backend!r}")
    return ops.convert_to_numpy(value), [
        np.zeros(np.shape(x)) if g is None else ops.convert_to_numpy(g) for x, g in zip(xs, grads)
    ]


def variable_grads(variables, loss_fn):
    """Gradients of ``loss_fn()`` w.r.t. ``variables`` (a list, or a layer/model:
    its trainable variables), as a NumPy list (``None`` where unused)."""
    if isinstance(variables, keras.layers.Layer):
        variables = variables.trainable_variables
    variables = list(variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, variables)
    elif backend == "jax":
        import jax

        def f(values):
            with StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn()

        grads = jax.grad(f)([v.value for v in variables])
    elif backend == "torch":
        import torch

        loss = loss_fn()
        grads = torch.autograd.grad(loss, [v.value for v in variables], allow_unused=True)
    else:  # pragma: no cover
        raise NotImplementedError(f"kquant.testing.variable_grads: backend {backend!r}")
    return [None if g is None else ops.convert_to_numpy(g) for g in grads]


_TWO_CPUS = """\
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
"""


def run_on_two_cpus(script: str, timeout: int = 600):
    """Run ``script`` in a fresh TensorFlow process whose CPU is split into two
    logical devices (``/cpu:0``, ``/cpu:1``) for ``tf.distribute.MirroredStrategy``.

    The split must happen before TensorFlow initialises, hence the subprocess.
    Returns the ``subprocess.CompletedProcess`` (text stdout/stderr).
    """
    import os
    import subprocess
    import sys
    import textwrap

    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", _TWO_CPUS + textwrap.dedent(script)],
                          capture_output=True, text=True, env=env, timeout=timeout)


_TWO_JAX_DEVICES = """\
import keras
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=keras.distribution.list_devices("cpu")))
"""


def run_on_two_jax_devices(script: str, timeout: int = 600):
    """Run ``script`` in a fresh JAX process with two host devices and
    ``keras.distribution.DataParallel`` over both already set as the global
    distribution (``XLA_FLAGS=--xla_force_host_platform_device_count=2``).

    Returns the ``subprocess.CompletedProcess`` (text stdout/stderr).
    """
    import os
    import subprocess
    import sys
    import textwrap

    flags = os.environ.get("XLA_FLAGS", "")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=2".strip()}
    return subprocess.run([sys.executable, "-c", _TWO_JAX_DEVICES + textwrap.dedent(script)],
                          capture_output=True, text=True, env=env, timeout=timeout)
