"""Whole-tensor sums and maxima that TensorFlow's XLA reduces at memory speed.

TensorFlow's XLA:CPU emits a full reduction of a fused element-wise body
(``Σ g·tanh W``, ``max |W|``) as one scalar loop: on a 2048×2048 kernel it
measured 2.9 ms for ``max|W|`` and 5.2 ms for ``Σ g·tanh W`` against 2.1 ms
for a whole element-wise ``tanh`` pass (TF 2.21, 2 cores, ``jit_compile=True``). Folding
the tensor to ``[k, n/k]``, reducing over the *major* axis (a vectorised
element-wise loop over ``n/k`` outputs), adding the two halves of that row
(which stops XLA merging the two reductions back into one) and reducing the
rest measured 1.2 ms and 2.4 ms. The result is the same sum in another order
(and exactly the same maximum). Only where TensorFlow's XLA compiles the code
(:func:`kquant.xla.in_xla`): TensorFlow's own kernels reduce at full speed
(folded: 4.7 vs 4.6 ms, 3.1 vs 2.8 ms), and JAX 0.10's XLA reduces the plain
form fast (``max|W|`` 1.2 ms, ``Σ g·tanh W`` 3.7 ms) and the folded one
12–15× slower. Tensors whose size is unknown or not divisible by ``2k`` take
the plain reduction. The values of these functions
are meant for custom gradients: autodiff of a folded maximum would not split
the gradient over ties the way ``ops.max`` does.

JAX's XLA:CPU (:func:`kquant.xla.ynn_reduces`) runs whole reductions as YNNPACK fusions,
which write out any operand they cannot fuse: :func:`max_abs` and
:func:`count_of_max` are written in forms they take whole (Dense 2048 train
step, both forms in one process: ``benchmarks/results/jax_cpu/forms_ab.md``).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from kquant.xla import in_xla, variadic_sum, ynn_reduces

FOLD = 8  # rows of the first, major-axis reduction (4–16 measured alike; 32 slower)


def _fold_here() -> bool:
    return keras.backend.backend() == "tensorflow" and in_xla()


def _foldable_size(x):
    """``x``'s size where the folded form applies here, else ``None``."""
    size = None if any(d is None for d in x.shape) else math.prod(int(d) for d in x.shape)
    if size is None or size < 4 * FOLD or size % (2 * FOLD) or not _fold_here():
        return None
    return size


def _folded(x, reduce, combine):
    size = _foldable_size(x)
    if size is None:
        return reduce(x)
    rows = reduce(ops.reshape(x, (FOLD, size // FOLD)), axis=0)
    half = size // (2 * FOLD)
    return reduce(combine(rows[:half], rows[half:]))


def total_sum(x):
    """``Σ x`` over every element (a scalar)."""
    return _folded(ops.convert_to_tensor(x), ops.sum, ops.add)


def total_max(x):
    """``max x`` over every element (a scalar)."""
    return _folded(ops.convert_to_tensor(x), ops.max, ops.maximum)


def total_sums(*xs):
    """``(Σ x for x in xs)`` (tensors of one shape and dtype), each over every element.
    Where TensorFlow's XLA folds: one variadic reduce over the ``[k, n/k]`` folds of all
    of them, one pass (TWN's ``Σ|W|·1{|W| > Δ}`` and ``#{|W| > Δ}`` on 2048², 2 CPU
    cores: 0.81 → 0.39 ms beyond the pass both read), then :func:`total_sum` of each
    row; elsewhere :func:`total_sum` of each."""
    xs = [ops.convert_to_tensor(x) for x in xs]
    size = _foldable_size(xs[0])
    wide = keras.backend.standardize_dtype(xs[0].dtype) in ("float32", "float64")
    if len(xs) < 2 or size is None or not wide:   # 16-bit: TF's Sum accumulates in float32
        return tuple(total_sum(x) for x in xs)
    rows = variadic_sum([ops.reshape(x, (FOLD, size // FOLD)) for x in xs], axis=0)
    return tuple(total_sum(r) for r in rows)


def max_abs(x):
    """``max |x|`` over every element (a scalar). Under JAX's XLA:CPU as
    ``max(max x, −min x)``: two reads of ``x`` and no ``|x|`` tensor, which XLA
    otherwise shares with the other readers of ``|x|`` and writes out (one ``max|x|``
    beside an abs-free tie count, ``Σ max(x, p) − p + max(−x, p) − p``, measured
    slower: DoReFa-2 Dense 2048 step 1.54/1.51× → 1.56/1.61× float)."""
    x = ops.convert_to_tensor(x)
    if ynn_reduces():
        return ops.maximum(ops.max(x), -ops.min(x))
    return total_max(ops.abs(x))


def count_of_max(x, big):
    """``#{|x| = big}`` for ``big = max|x|``, exactly (``1`` where ``big`` is below
    10⁻³⁰), as one sum YNNPACK fuses: with ``p`` the float just below ``big``
    (:func:`float_below`), ``max(|x|, p) − p`` is ``big − p`` at a tie and 0 elsewhere,
    so the sum is the count times that power of two, exactly (below 2²⁴ ties; ``p`` is
    not formed as ``big·(1 − 2⁻²⁴)``, which XLA contracts with ``big − p`` into one
    fused multiply-add of another value). Under JAX's XLA:CPU: one read of ``x`` instead
    of a 0/1 tensor written out and read back."""
    x, big = ops.convert_to_tensor(x), ops.convert_to_tensor(big)
    normal = big >= 1e-30
    top = ops.where(normal, big, 1.0)
    below = float_below(top)
    total = total_sum(ops.maximum(ops.abs(x), below) - below)
    return ops.where(normal, total / (top - below), 1.0)


def written_once(x):
    """``x`` itself; under JAX's XLA:CPU computed in one loop and written out once
    before the sums that read it: a select that never fires (nothing exceeds +inf;
    NaN neither) is an op YNNPACK does not fuse, so XLA stops there instead of writing
    out each operand of ``x`` for a sum that fuses only their products (HTGE's
    step-gradient terms: ``q``, ``z`` and ``F'·g``; TWN's kept mask and values)."""
    if not ynn_reduces():
        return x
    return ops.where(x > float("inf"), 0.0, x)


def float_below(x):
    """Backend seam: the float next to each element of ``x`` towards 0 (``nextafter``)."""
    x = ops.convert_to_tensor(x)
    backend = keras.backend.backend()
    if backend == "jax":
        from jax import lax

        return lax.nextafter(x, ops.zeros_like(x))
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.math.nextafter(x, tf.zeros_like(x))
    if backend == "torch":
        import torch

        return torch.nextafter(x, torch.zeros_like(x))
    import numpy as np

    x = ops.convert_to_numpy(x)
    return ops.convert_to_tensor(np.nextafter(x, np.zeros_like(x)))
