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


def take_step(layer, loss_fn):
    """One optimizer step with learning rate 0 on ``layer``'s trainable variables for
    ``loss_fn()``: the step statistics (:mod:`kquant.step_state`, e.g. a data-initialised
    interval) take the values the forward pass committed; nothing else changes."""
    if not layer.built:
        loss_fn()  # builds it (a training call alone stores nothing)
    variables = list(layer.trainable_variables)
    grads = variable_grads(variables, loss_fn)
    keep = [(g, v) for g, v in zip(grads, variables) if g is not None]
    keras.optimizers.SGD(0.0).apply([ops.convert_to_tensor(g, v.dtype) for g, v in keep],
                                    [v for _, v in keep])


def xla_launches(graph) -> int:
    """XLA-compiled function calls directly in a TensorFlow ``graph`` (ops marked
    ``_XlaMustCompile``, as :mod:`kquant.xla` compiles a function apart)."""
    return sum(bool(op.get_attr("_XlaMustCompile")) for op in graph.get_operations()
               if "_XlaMustCompile" in op.node_def.attr)


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


_REPLICA_CONTEXTS = {
    "mirrored": """
import contextlib, tensorflow as tf
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one: collective keys are per strategy
NREP = STRATEGY.num_replicas_in_sync
REPLICAS = STRATEGY.scope
ONE = contextlib.nullcontext
JIT = False   # MirroredStrategy cannot jit_compile (XLA cannot place its per-device variables)
""",
    "data_parallel": """
import contextlib, keras
DP = keras.distribution.distribution()
NREP = len(DP.device_mesh.devices.ravel())
keras.distribution.set_distribution(None)
@contextlib.contextmanager
def REPLICAS():
    keras.distribution.set_distribution(DP)
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)
ONE = contextlib.nullcontext
JIT = True
""",
}


def run_replicated(script: str, strategy: str, timeout: int = 600):
    """Run ``script`` in a fresh process for a one-device vs two-replica comparison.

    ``strategy`` is ``"mirrored"`` (TensorFlow ``MirroredStrategy`` on 2 logical
    CPUs) or ``"data_parallel"`` (JAX ``keras.distribution.DataParallel`` on 2 host
    devices). The script sees ``REPLICAS()`` (a context: build/train on both
    replicas), ``ONE()`` (one device), ``NREP`` (replica count) and ``JIT``
    (whether ``jit_compile=True`` works under the strategy).
    """
    runners = {"mirrored": run_on_two_cpus, "data_parallel": run_on_two_jax_devices}
    if strategy not in runners:
        raise ValueError(f"strategy must be one of {sorted(runners)}, got {strategy!r}")
    import textwrap

    return runners[strategy](_REPLICA_CONTEXTS[strategy] + textwrap.dedent(script), timeout=timeout)


def json_result(proc):
    """The object a subprocess printed on its ``JSON{...}`` line; fails with its stderr tail."""
    import json

    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[4:])


def pytest_collection_modifyitems(config, items):
    """pytest hook for kquant's and its plugins' ``conftest.py`` (import it there):
    tests marked ``tf_only`` are skipped on any other backend."""
    import pytest

    backend = keras.backend.backend()
    skip = pytest.mark.skip(reason=f"needs the TensorFlow backend (running {backend})")
    for item in items:
        if "tf_only" in item.keywords and backend != "tensorflow":
            item.add_marker(skip)


def fresh_state(*registries, seed: int = 1234):
    """Per-test reset for conftest fixtures: reload the given plugin registries (a
    package may have been installed after kquant was first imported), then seed
    Keras and NumPy."""
    for registry in registries:
        registry.reload()
    keras.utils.set_random_seed(seed)
    np.random.seed(seed)
