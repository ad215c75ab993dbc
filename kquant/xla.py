"""Backend seam for XLA: whether code is being compiled by XLA, and compiling a
pure tensor function with it where the step around it is not.

Code that picks a formulation by compiler (a fused multiply-reduce instead of
a batched dot, a folded reduction, an exhaustive search) asks :func:`in_xla`
at trace time; nothing else in kquant imports TensorFlow's XLA internals.
"""

from __future__ import annotations


def in_xla() -> bool:
    """Backend seam: whether the step is being compiled by XLA (JAX: always;
    TensorFlow: inside a ``jit_compile`` function; torch: never)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        return True
    if backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        return (not tf.executing_eagerly()
                and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    return False


def ynn_reduces() -> bool:
    """Backend seam: whether JAX's XLA:CPU compiles the step. JAX 0.10 hands a whole
    reduction to YNNPACK, which takes the element-wise producer fused only when it is
    read by nothing else (else it is written out first) and never fuses a compare,
    a clamp or a broadcast constant: :mod:`kquant.reductions` and the quantizers
    then pick forms it fuses."""
    import keras

    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def compile_with_xla(fn):
    """Backend seam: ``fn`` (a function of tensors; it may read and assign variables
    it closes over), run XLA-compiled where the step around it is not: TensorFlow
    without ``jit_compile``, outside
    ``tf.distribute`` (decided per call, at trace time; a strategy's replicas
    would each compile it at every trace: the ALQ pipeline test on 2 replicas
    took 129 s instead of 40). Everywhere else ``fn`` itself runs (JAX and
    ``jit_compile`` steps are compiled already; torch has no XLA)."""
    if not _tensorflow():
        return fn
    import tensorflow as tf

    compiled = _xla_function(fn)

    def run(*args):
        if not _compiled_apart():
            return fn(*args)
        return compiled(*(tf.convert_to_tensor(a) for a in args))

    return run


def compiled_in_graph(fn, training=None):
    """Backend seam: ``fn`` (a pure function of tensors) XLA-compiled when TensorFlow
    traces it for a training call (``training is True``) into a graph that XLA does
    not compile — a ``jit_compile=False`` train step, Keras' default on a CPU-only
    TensorFlow — outside ``tf.distribute``; else ``fn`` itself (eager calls would compile at every call; JAX and ``jit_compile``
    steps are compiled already; torch has no XLA; an inference graph stays plain ops,
    as exporters such as tf2onnx read it op by op). Decided when called, at trace time.

    For a quantizer's fused forward and backward: TensorFlow's kernels run each
    element-wise op as its own pass over the kernel, XLA one fused loop (DoReFa
    2-bit, Dense 2048 train step without ``jit_compile``: 1.86× → 1.35× the float
    step)."""
    if training is not True or not compiles_apart():
        return fn
    return _xla_function(fn)


def compiles_apart() -> bool:
    """Backend seam: whether this is a TensorFlow graph being traced that XLA does not
    compile, outside ``tf.distribute``: where :func:`compile_with_xla` compiles."""
    if not _tensorflow():
        return False
    import tensorflow as tf

    return not tf.executing_eagerly() and _compiled_apart()


def _tensorflow() -> bool:
    import keras

    return keras.backend.backend() == "tensorflow"


def _compiled_apart() -> bool:
    """TensorFlow code outside XLA and outside ``tf.distribute``: where a function is
    worth compiling on its own."""
    import tensorflow as tf

    return not in_xla() and not tf.distribute.has_strategy()


def materialize(tensors, predicate):
    """Backend seam: ``tensors`` unchanged, but under XLA computed in full before any
    consumer reads them: both branches of a conditional on ``predicate`` (a float
    scalar of the data, so that XLA cannot fold it) return them, and XLA fuses no
    producer across a conditional's boundary (``optimization_barrier`` does not stop
    the fusion on XLA:CPU). For an expensive producer with several consumers, each of
    which XLA would otherwise recompute it into: ALQ's bases search feeding the bases
    and the Eq. 23 refit (TF CPU, 500 groups of 200, I = 8: 10.9 → 2.4 ms). Outside
    XLA the tensors themselves."""
    from keras import ops

    tensors = tuple(tensors)
    if not in_xla():
        return tensors
    return tuple(ops.cond(predicate < 0, lambda: tensors, lambda: tensors))


def _xla_function(fn):
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False)


def variadic_sum(tensors, axis):
    """Backend seam: ``[Σ_axis t for t in tensors]`` (tensors of one shape and dtype) as
    one XLA reduce, one pass over all of them. TensorFlow's XLA only: call it where
    :func:`in_xla` holds on TensorFlow."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    n, dtype = len(tensors), tensors[0].dtype
    spec = tf.TensorSpec((), dtype)
    add = tf.function(lambda *a: tuple(a[i] + a[n + i] for i in range(n)), autograph=False)
    return list(xla.variadic_reduce(list(tensors), [tf.zeros((), dtype)] * n, [axis],
                                    add.get_concrete_function(*[spec] * (2 * n))))
