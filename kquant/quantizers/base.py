"""The quantizer: a forward map and its gradient estimator.

``Q(x) = post(step(pre(x)))`` where ``step`` is a :class:`~kquant.staircase.Staircase`
whose backward pass belongs to the :class:`~kquant.estimators.Estimator`.
A quantizer is a small Keras layer carrying its ``precision`` (bits), so it
owns variables (learnable steps, estimator state) that save with the model,
and it can :meth:`encode` its output into integer codes plus a few floats
that :meth:`decode` turns back into exactly the same values.

Mixed precision (``mixed_float16``, ``mixed_bfloat16``): a quantizer computes
its staircase and levels in float32 whatever the policy (its input is upcast,
a latent kernel is read in float32, its variables are never autocast), and
casts the result to the compute dtype of the layer using it only when that
cast keeps the ``2^bits`` levels distinct: ``bits ≤ 11`` in float16 (11
significant bits), ``bits ≤ 8`` in bfloat16 (8). Wider quantizers return
float32 (e.g. 16-bit DoReFa, whose ``65535·w`` also overflows float16), and
Keras' ops promote the layer's product to float32. :meth:`decode` applies the
same cast, so deployed values equal the trained ones.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kquant import estimators
from kquant.reductions import total_sum

#: Significant bits of a float dtype: up to this many bits, the ``2^bits``
#: integer levels of a quantizer stay distinct after a cast to it.
SIGNIFICANT_BITS = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}


def _autocast_seam():
    """Keras' autocast scope (private API, one seam): ``(AutocastScope, get_autocast_scope)``."""
    from keras.src.backend import AutocastScope, get_autocast_scope

    return AutocastScope, get_autocast_scope


def exact_dtype(precision: int, dtype) -> str:
    """``dtype`` if ``2^precision`` levels survive a cast to it, else ``"float32"``."""
    dtype = keras.backend.standardize_dtype(dtype)
    if not keras.backend.is_float_dtype(dtype):
        return "float32"
    return dtype if int(precision) <= SIGNIFICANT_BITS.get(dtype, 24) else "float32"


def check_bits(bits, argument="bits", low=1, high=16) -> int:
    """Validate a bit width; the error names the argument."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"`{argument}` must be an integer in [{low}, {high}], got {bits!r}.")
    if not low <= int(bits) <= high:
        raise ValueError(f"`{argument}` must be an integer in [{low}, {high}], got {bits}.")
    return int(bits)


def apply_slope(g, slope, s_fn):
    """``g·F'(s)`` (``s_fn()`` evaluated only when ``F'`` is not the constant 1)."""
    if isinstance(slope, float) and slope == 1.0:
        return g
    return g * ops.cast(slope(s_fn()), g.dtype)


def sum_to(g, target):
    """``g`` summed over the axes that ``target`` broadcasts along, in ``target``'s shape."""
    if len(target.shape) == 0:
        return total_sum(g)
    axes = [i for i, d in enumerate(target.shape) if d == 1 and g.shape[i] != 1]
    return ops.reshape(ops.sum(g, axis=axes, keepdims=True), ops.shape(target))


class Quantizer(keras.layers.Layer):
    """Base class: ``pre`` to staircase units, estimator-owned step, ``post`` back."""

    default_estimator = "ste"

    def __init__(self, estimator=None, **kwargs):
        kwargs.setdefault("autocast", False)  # levels and variables in float32 (mixed precision)
        super().__init__(**kwargs)
        self.estimator = estimators.get(estimator if estimator is not None else self.default_estimator)
        self._target_dtype = None

    # -- what subclasses define ----------------------------------------------
    @property
    def precision(self) -> int:
        """Bits per quantized value."""
        raise NotImplementedError

    @property
    def staircase(self):
        raise NotImplementedError

    def pre(self, x, training=None):
        """``(z, params)``: staircase coordinate and the tensors ``post`` needs."""
        raise NotImplementedError

    def post(self, q, params):
        raise NotImplementedError

    def fused(self, x, slope, training=None):
        """``post(step(pre(x)))`` as one custom-gradient function with a hand-written
        backward, or ``None`` (then the generic path runs).

        Called only with a stateless elementwise estimator whose ``F'`` is ``slope``
        (``1.0`` for STE). The value and every gradient equal the generic path's (the
        chain rule written out, equal up to float rounding); the point is cost: the
        backward is a few elementwise products plus the reductions the formula needs,
        instead of autodiff through every intermediate op; it recomputes ``z`` (``tanh W``)
        from the latent value rather than saving it or F'(s), and reuses the forward's
        statistics (``max|tanh W|``). Both halves are pure functions of tensors, XLA-compiled
        for training calls traced into a TensorFlow graph that XLA does not compile
        (:func:`kquant.xla.compiled_in_graph`). A subclass that overrides
        ``pre``/``post``/``staircase`` gets the generic path (:meth:`_fusable`).
        """
        return None

    def _fusable(self, cls) -> bool:
        """``True`` when ``pre``, ``post`` and ``staircase`` are ``cls``'s own (the maps
        its :meth:`fused` writes out), not a subclass's."""
        return all(getattr(type(self), name) is getattr(cls, name)
                   for name in ("pre", "post", "staircase"))

    def extra_bits(self, shape) -> int:
        """Bits of float parameters stored beside the codes (scales, steps) for ``shape``."""
        return 0

    # -- Keras layer -----------------------------------------------------------
    def build(self, input_shape):
        if not self.estimator.built:
            self.estimator.build(input_shape)
        self.built = True

    def output_dtype(self, compute_dtype=None) -> str:
        """The dtype of the quantized output for a layer computing in ``compute_dtype``
        (default: this quantizer's policy): that dtype when exact for the level set."""
        return exact_dtype(self.precision, compute_dtype or self.compute_dtype)

    def __call__(self, x, *args, **kwargs):
        autocast_scope, get_scope = _autocast_seam()
        scope = get_scope()  # the calling layer's compute dtype, if it autocasts
        self._target_dtype = scope.dtype if scope is not None else None
        if isinstance(x, keras.Variable):  # a latent kernel: read it in float32, not autocast
            with autocast_scope(None):
                x = ops.convert_to_tensor(x)
        return super().__call__(x, *args, **kwargs)

    def call(self, x, training=None):
        autocast_scope, _ = _autocast_seam()
        out_dtype = self.output_dtype(self._target_dtype)
        with autocast_scope(None):  # estimator variables too are read in float32
            x = ops.convert_to_tensor(x)
            if keras.backend.standardize_dtype(x.dtype) != "float32":
                x = ops.cast(x, "float32")
            slope = getattr(self.estimator, "fused_slope", lambda: None)()
            y = None if slope is None else self.fused(x, slope, training=training)
            if y is None:
                z, params = self.pre(x, training=training)
                q = self.estimator.step(z, self.staircase, x=x, training=training)
                y = self.post(q, params)
        return y if out_dtype == "float32" else ops.cast(y, out_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    # -- deployment ----------------------------------------------------------
    def encode(self, x):
        """Inference-time ``(codes, params)``: level indices ``0..2^bits−1`` and floats."""
        x = ops.cast(ops.convert_to_tensor(x), "float32")
        z, params = self.pre(x, training=False)
        codes = self.staircase.to_level_index(self.staircase.hard(z))
        return ops.convert_to_numpy(codes), {k: ops.convert_to_numpy(v) for k, v in params.items()}

    def decode(self, codes, params, compute_dtype=None):
        """The exact quantized values for ``encode``'s output, in :meth:`output_dtype`
        of ``compute_dtype`` (default: this quantizer's policy), as ``call`` gives them."""
        st = self.staircase
        codes = ops.convert_to_tensor(np.asarray(codes), "float32")
        q = 2.0 * codes - 1.0 if st.binary else codes + st.lo
        y = self.post(q, {k: ops.convert_to_tensor(v) for k, v in params.items()})
        out_dtype = self.output_dtype(compute_dtype)
        return y if out_dtype == "float32" else ops.cast(y, out_dtype)

    # -- serialization ---------------------------------------------------------
    def get_config(self):
        return {"name": self.name, "estimator": estimators.serialize(self.estimator)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
