"""The fused form shared by the sign and ternary quantizers: a staircase of the input
scaled by statistics of it that the backward pass holds constant.

``Q(x) = a·step(x/d)`` with ``(a, d) = stats(x)`` (sign: ``a = d = 1``; BWN:
``a = mean|W|``; TWN: ``d = 2Δ``, ``a = α``; BitNet: ``d = γ + ε``, ``a = γ``), so
``∂ℓ/∂x = a·F'(s)·g/d``, ``s`` the distance of ``x/d`` to the nearest boundary.
The statistics are computed inside the forward half (whole-tensor sums through
:func:`kquant.reductions.total_sum`) and both halves are pure functions of
tensors, XLA-compiled for training calls traced into a TensorFlow graph that XLA
does not compile (:func:`kquant.xla.compiled_in_graph`). With the STE the
backward reads only ``g``: ``g·a/d``, left to TensorFlow as a plain product.
"""

from __future__ import annotations

import math

from keras import ops

from kquant.estimators.base import as_tensor
from kquant.quantizers.base import apply_slope
from kquant.reductions import _fold_here, total_sum, total_sums, written_once
from kquant.xla import compiled_in_graph


def scaled_staircase(x, slope, staircase, training, stats=None):
    """``a·staircase(x/d)`` and its estimator's gradient ``a·F'(s)·g/d``.

    ``stats(x) -> (a, d)`` (tensors broadcasting against ``x``; ``d`` may be ``None``
    for 1) runs inside the forward half; ``None``: ``a = d = 1``. ``x/d`` is taken as
    ``x·(1/d)``: XLA recomputes a product in every loop that reads it, while a quotient
    (an "expensive" op to it) read by the statistics and the staircase is stored and
    read back (TWN's Dense 2048 train step, 60 interleaved steps on 2 CPU cores: 1.20×
    → 1.18× float with XLA, 1.42× → 1.31× without). The quantizers' ``pre`` use the
    same form, so trained and deployed values agree (it may differ from ``x/d`` by an
    ulp: a level flip only on a boundary)."""

    def forward(x):
        if stats is None:
            return staircase.hard(x)
        a, d = stats(x)
        z = x if d is None else x * (1.0 / d)   # see `scaled_staircase`
        return (staircase.hard(z) * a, a) if d is None else (staircase.hard(z) * a, a, d)

    def backward(g, x, *consts):
        a, d = (consts + (None, None))[:2]
        g = apply_slope(g, slope, lambda: staircase.distance(x if d is None else x * (1.0 / d)))
        if a is not None:
            g = g * (a if d is None else a / d)
        return g

    ste = is_ste(slope)
    # the STE's backward reads only g: ∂ℓ/∂x = g (sign) or a scalar product g·a/d
    return one_input(forward, backward, x, training, identity=stats is None and ste,
                     compile_backward=not ste)


def is_ste(slope) -> bool:
    """The estimator's ``F'`` is 1 (the STE): its backward is the identity."""
    return isinstance(slope, float) and slope == 1.0


def one_input(forward, backward, x, training, extra=(), identity=False, compile_backward=True):
    """``forward(x, *extra)`` with its hand-written ``backward(g, x, *saved) → ∂ℓ/∂x`` as
    one custom-gradient function of ``x``. ``forward`` returns ``y`` or ``(y, *saved)``
    (statistics of ``x`` the backward holds constant); ``extra`` are inputs that get no
    gradient (a noise seed); ``identity``: ``∂ℓ/∂x = g`` without a call. Both halves
    pure, compiled for training graphs (:func:`compiled_in_graph`), but for a backward
    that is ``g`` times saved statistics (``compile_backward=False``): one plain product,
    which TensorFlow folds into the optimizer's ``lr·g`` where it is a scalar; an XLA
    launch is one more pass over the kernel (TWN and BitNet with the STE, Dense 2048
    train step without ``jit_compile``, 3 interleaved runs of 180–240 steps on 2 CPU
    cores: TWN 1.22–1.25× → 1.17–1.19× float, BitNet 1.15–1.23× → 1.09–1.15×)."""
    forward = compiled_in_graph(forward, training)
    if compile_backward:
        backward = compiled_in_graph(backward, training)

    @ops.custom_gradient
    def fn(x):
        out = forward(x, *extra)
        y, saved = (out[0], tuple(out[1:])) if isinstance(out, (tuple, list)) else (out, ())

        def grad(*args, upstream=None):
            g = args[0] if upstream is None else upstream
            return g if identity else backward(g, x, *saved)

        return y, grad

    return fn(as_tensor(x))


def mean_abs(x, axes=None):
    """``mean|x|`` over ``axes`` (``None``: the whole tensor, a scalar; under TensorFlow's
    XLA via :func:`~kquant.reductions.total_sum`), kept broadcastable against ``x``."""
    if axes is not None:
        return ops.mean(ops.abs(x), axis=axes, keepdims=True)
    if not _fold_here() or any(d is None for d in x.shape):
        return ops.mean(ops.abs(x))   # what `pre` computes: trained values = deployed values
    return total_sum(ops.abs(x)) / float(math.prod(int(d) for d in x.shape))


def masked_mean(values, mask, axes=None):
    """``Σ values·mask / max(Σ mask, 1)`` over ``axes`` (``None``: the whole tensor)."""
    if axes is None:
        mask = written_once(mask)   # JAX's CPU: both sums fuse its product
        total, count = total_sums(values * mask, mask)   # one pass
    else:
        total = ops.sum(values * mask, axis=axes, keepdims=True)
        count = ops.sum(mask, axis=axes, keepdims=True)
    return total / ops.maximum(count, 1.0)


def with_parameter(forward, backward, x, parameter, training):
    """``forward(x, p)`` with its hand-written ``backward(g, x, p) → (∂ℓ/∂x, ∂ℓ/∂p)`` as
    one custom-gradient function of ``x`` and a parameter tensor ``p`` (a step, a clip
    bound); both halves pure, compiled for training graphs (:func:`compiled_in_graph`)."""
    forward, backward = (compiled_in_graph(f, training) for f in (forward, backward))

    @ops.custom_gradient
    def fn(x, p):
        def grad(*args, upstream=None):
            return backward(args[0] if upstream is None else upstream, x, p)

        return forward(x, p), grad

    return fn(as_tensor(x), as_tensor(parameter))
