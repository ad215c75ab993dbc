"""QKeras's API on kquant: ``from kquant_compat.qkeras import QDense, quantized_bits, …``.

Quantizers keep QKeras's names, argument names and gradients (QKeras's
``x + stop_gradient(−x + Q(x))`` form, ``use_ste=True``):

* ``quantized_bits(bits, integer, symmetric, keep_negative, alpha)`` — with
  ``m = 2^(bits − keep_negative)``, ``m_i = 2^integer``:
  ``α·m_i·clip(round(x·m/m_i), keep_negative·(−m + symmetric), m − 1)/m`` (``bits −
  keep_negative = 0``: ``α·sign(x)``); gradient ``g``.
* ``quantized_relu(bits, integer)`` — ``m_i·clip(round(relu(x)·m/m_i), 0, m − 1)/m``,
  ``m = 2^bits``; gradient ``g·1{0 < x ≤ m_i(1 − 1/m)}``.
* ``binary(use_01, alpha)`` — ``α·sign(x)`` (``sign(0) = +1``; ``use_01``: ``α·(sign(x)+1)/2``);
  gradient ``g·(1 − tanh² x)`` with ``alpha=None``, ``g`` with a number.
* ``ternary(alpha, threshold)`` — ``α·sign(x)·1{|x| ≥ t}``, ``t = 0.33`` by default;
  gradient as ``binary``.

Argument values outside this subset (``alpha="auto"``/``"auto_po2"``, stochastic
rounding, ``qnoise_factor ≠ 1``, sigmoid or leaky ReLU, …) raise a ``ValueError``
naming the argument. Rounding ties go up (QKeras's ``tf.round`` rounds half to
even) and ``ternary`` maps ``x = −t`` to 0: measure-zero differences.

Layers: ``QDense``, ``QConv2D`` (kquant's layers with QKeras's ``kernel_quantizer``
and ``bias_quantizer``; QKeras strings such as ``"quantized_bits(4,0,1)"`` work)
and ``QActivation`` (a quantizer, or a plain Keras activation, as a layer).
"""

from __future__ import annotations

import ast

import keras
from keras import ops

from kquant import quantizers as _quantizers
from kquant.layers import QuantConv2D, QuantDense
from kquant.quantizers import Quantizer, check_bits
from kquant.staircase import Staircase
from kquant.validation import check_number
from kquant_compat.base import CompatQuantizer

_SIGN = Staircase.sign()
_TERNARY = Staircase(-1.0, 1.0)


def _flag(value, argument):
    """QKeras flags are bools or 0/1."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    raise ValueError(f"`{argument}` must be True/False or 0/1, got {value!r}.")


def _unsupported(argument, value, supported):
    if value != supported:
        raise ValueError(f"`{argument}`={value!r} is not supported by kquant-compat "
                         f"(only {supported!r}).")


def _alpha(alpha):
    if isinstance(alpha, str):
        raise ValueError(f"`alpha`={alpha!r} is not supported by kquant-compat: use None or a "
                         "number (or kquant's 'bwn'/'uniform' for learned or data scales).")
    return None if alpha is None else check_number(alpha, "alpha", gt=0)


def _integer(value, argument="integer"):
    if isinstance(value, bool) or not isinstance(value, int) or not -16 <= value <= 16:
        raise ValueError(f"`{argument}` must be an integer in [-16, 16], got {value!r}.")
    return value


class _QKeras(CompatQuantizer):
    library = "QKeras"


@keras.saving.register_keras_serializable(package="kquant_compat")
class quantized_bits(_QKeras):  # noqa: N801 (QKeras's name)
    """QKeras quantized_bits: α·m_i·clip(round(x·m/m_i), lo, m−1)/m, straight-through gradient."""

    def __init__(self, bits=8, integer=0, symmetric=0, keep_negative=True, alpha=None,
                 use_stochastic_rounding=False, scale_axis=None, qnoise_factor=1.0,
                 var_name=None, use_ste=True, use_variables=False, **kwargs):
        super().__init__(**kwargs)
        self.bits = check_bits(bits, "bits", 1, 16)
        self.integer = _integer(integer)
        self.symmetric = _flag(symmetric, "symmetric")
        self.keep_negative = bool(_flag(keep_negative, "keep_negative"))
        self.alpha = _alpha(alpha)
        _unsupported("use_stochastic_rounding", use_stochastic_rounding, False)
        _unsupported("scale_axis", scale_axis, None)
        _unsupported("qnoise_factor", qnoise_factor, 1.0)
        _unsupported("var_name", var_name, None)
        _unsupported("use_ste", use_ste, True)
        _unsupported("use_variables", use_variables, False)
        self.unsigned_bits = self.bits - int(self.keep_negative)

    @property
    def precision(self):
        return self.bits

    @property
    def staircase(self):
        if self.unsigned_bits == 0:
            return _SIGN
        m = 2.0**self.unsigned_bits
        return Staircase(float(self.keep_negative) * (-m + self.symmetric), m - 1.0)

    def level_map(self, x):
        if self.unsigned_bits == 0:
            return x, {}
        return x * (2.0**self.unsigned_bits) / (2.0**self.integer), {}

    def value_map(self, q, params):
        if self.unsigned_bits > 0:
            q = (2.0**self.integer) * q / (2.0**self.unsigned_bits)
        return q if self.alpha is None else self.alpha * q

    def derivative(self, x):
        return ops.ones_like(x)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "integer": self.integer,
                "symmetric": self.symmetric, "keep_negative": self.keep_negative,
                "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="kquant_compat")
class quantized_relu(_QKeras):  # noqa: N801
    """QKeras quantized_relu: m_i·clip(round(relu(x)·m/m_i), 0, m−1)/m, g·1{0 < x ≤ top}."""

    def __init__(self, bits=8, integer=0, use_sigmoid=0, negative_slope=0.0,
                 use_stochastic_rounding=False, relu_upper_bound=None, is_quantized_clip=True,
                 qnoise_factor=1.0, var_name=None, use_ste=True, use_variables=False, **kwargs):
        super().__init__(**kwargs)
        self.bits = check_bits(bits, "bits", 1, 16)
        self.integer = _integer(integer)
        _unsupported("use_sigmoid", use_sigmoid, 0)
        _unsupported("negative_slope", negative_slope, 0.0)
        _unsupported("use_stochastic_rounding", use_stochastic_rounding, False)
        _unsupported("relu_upper_bound", relu_upper_bound, None)
        _unsupported("is_quantized_clip", is_quantized_clip, True)
        _unsupported("qnoise_factor", qnoise_factor, 1.0)
        _unsupported("var_name", var_name, None)
        _unsupported("use_ste", use_ste, True)
        _unsupported("use_variables", use_variables, False)

    @property
    def precision(self):
        return self.bits

    @property
    def staircase(self):
        return Staircase(0.0, 2.0**self.bits - 1.0)

    def level_map(self, x):
        return x * (2.0**self.bits) / (2.0**self.integer), {}

    def value_map(self, q, params):
        return (2.0**self.integer) * q / (2.0**self.bits)

    def derivative(self, x):
        top = 2.0**self.integer - 2.0 ** (self.integer - self.bits)
        return ops.cast((x > 0) & (x <= top), x.dtype)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "integer": self.integer}


class _SignLike(_QKeras):
    def derivative(self, x):
        if self.alpha is None:  # QKeras differentiates through tanh(x) when alpha is None
            t = ops.tanh(x)
            return 1.0 - t * t
        return ops.ones_like(x)


@keras.saving.register_keras_serializable(package="kquant_compat")
class binary(_SignLike):  # noqa: N801
    """QKeras binary: α·sign(x) (or α·(sign(x)+1)/2), gradient g·(1 − tanh²x) (alpha=None) or g."""

    def __init__(self, use_01=False, alpha=None, use_stochastic_rounding=False, **kwargs):
        super().__init__(**kwargs)
        self.use_01 = bool(_flag(use_01, "use_01"))
        self.alpha = _alpha(alpha)
        _unsupported("use_stochastic_rounding", use_stochastic_rounding, False)

    @property
    def precision(self):
        return 1

    @property
    def staircase(self):
        return _SIGN

    def level_map(self, x):
        return x, {}

    def value_map(self, q, params):
        if self.use_01:
            q = (q + 1.0) / 2.0
        return q if self.alpha is None else self.alpha * q

    def get_config(self):
        return {**super().get_config(), "use_01": self.use_01, "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="kquant_compat")
class ternary(_SignLike):  # noqa: N801
    """QKeras ternary: α·sign(x)·1{|x| ≥ t} (t = 0.33), g·(1 − tanh²x) (alpha=None) or g."""

    def __init__(self, alpha=None, threshold=None, use_stochastic_rounding=False,
                 number_of_unrolls=5, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _alpha(alpha)
        if isinstance(threshold, str):
            raise ValueError(f"`threshold`={threshold!r} is not supported by kquant-compat: "
                             "use None (0.33) or a number.")
        self.threshold = None if threshold is None else check_number(threshold, "threshold", gt=0)
        _unsupported("use_stochastic_rounding", use_stochastic_rounding, False)
        if isinstance(number_of_unrolls, bool) or not isinstance(number_of_unrolls, int) \
                or number_of_unrolls < 1:
            raise ValueError("`number_of_unrolls` must be an integer >= 1, "
                             f"got {number_of_unrolls!r}.")
        self.number_of_unrolls = number_of_unrolls  # used by QKeras only for alpha="auto"

    @property
    def precision(self):
        return 2

    @property
    def staircase(self):
        return _TERNARY

    def level_map(self, x):
        t = 0.33 if self.threshold is None else self.threshold
        return x / (2.0 * t), {}

    def value_map(self, q, params):
        return q if self.alpha is None else self.alpha * q

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "threshold": self.threshold,
                "number_of_unrolls": self.number_of_unrolls}


QUANTIZERS = {cls.__name__: cls for cls in (quantized_bits, quantized_relu, binary, ternary)}


def get_quantizer(identifier):
    """A quantizer from a QKeras string (``"quantized_bits(4,0,1)"``, ``"binary"``), a kquant
    name or config, or an instance; ``None`` stays ``None``."""
    if identifier is None or isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, str):
        try:
            node = ast.parse(identifier.strip(), mode="eval").body
        except SyntaxError:
            node = None
        if isinstance(node, ast.Name) and node.id in QUANTIZERS:
            return QUANTIZERS[node.id]()
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in QUANTIZERS):
            try:
                args = [ast.literal_eval(a) for a in node.args]
                kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except ValueError:
                raise ValueError(f"Quantizer string {identifier!r}: arguments must be "
                                 "literals.") from None
            return QUANTIZERS[node.func.id](*args, **kwargs)
    return _quantizers.get(identifier)


def _no_ranges(kernel_range, bias_range):
    _unsupported("kernel_range", kernel_range, None)
    _unsupported("bias_range", bias_range, None)


class _BiasQuantizer:
    """``bias_quantizer``: the bias the forward pass adds is ``bias_quantizer(bias)``."""

    def _init_bias_quantizer(self, bias_quantizer):
        self.bias_quantizer = get_quantizer(bias_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        if self.bias_quantizer is not None and self.bias is not None \
                and not self.bias_quantizer.built:
            self.bias_quantizer.build(tuple(self.bias.shape))

    def _bias_config(self):
        return {"bias_quantizer": _quantizers.serialize(self.bias_quantizer)}


@keras.saving.register_keras_serializable(package="kquant_compat")
class QDense(_BiasQuantizer, QuantDense):
    """QKeras QDense: kquant's QuantDense with ``kernel_quantizer`` and ``bias_quantizer``."""

    def __init__(self, units, kernel_quantizer=None, bias_quantizer=None, kernel_range=None,
                 bias_range=None, **kwargs):
        _no_ranges(kernel_range, bias_range)
        super().__init__(units, kernel_quantizer=get_quantizer(kernel_quantizer), **kwargs)
        self._init_bias_quantizer(bias_quantizer)

    def call(self, inputs, training=None):
        x = ops.matmul(self.quantized_inputs(inputs, training), self.quantized_kernel(training))
        if self.bias is not None:
            bias = self.bias if self.bias_quantizer is None else self.bias_quantizer(
                self.bias, training=training)
            x = ops.add(x, bias)
        return x if self.activation is None else self.activation(x)

    def get_config(self):
        return {**super().get_config(), **self._bias_config()}


@keras.saving.register_keras_serializable(package="kquant_compat")
class QConv2D(_BiasQuantizer, QuantConv2D):
    """QKeras QConv2D: kquant's QuantConv2D with ``kernel_quantizer`` and ``bias_quantizer``."""

    def __init__(self, filters, kernel_size, kernel_quantizer=None, bias_quantizer=None,
                 kernel_range=None, bias_range=None, **kwargs):
        _no_ranges(kernel_range, bias_range)
        super().__init__(filters, kernel_size, kernel_quantizer=get_quantizer(kernel_quantizer),
                         **kwargs)
        self._init_bias_quantizer(bias_quantizer)

    def call(self, inputs, training=None):
        outputs = self.convolution_op(self.quantized_inputs(inputs, training),
                                      self.quantized_kernel(training))
        if self.bias is not None:
            bias = self.bias if self.bias_quantizer is None else self.bias_quantizer(
                self.bias, training=training)
            shape = ((1, 1, 1, self.filters) if self.data_format == "channels_last"
                     else (1, self.filters, 1, 1))
            outputs = ops.add(outputs, ops.reshape(bias, shape))
        return outputs if self.activation is None else self.activation(outputs)

    def get_config(self):
        return {**super().get_config(), **self._bias_config()}


@keras.saving.register_keras_serializable(package="kquant_compat")
class QActivation(keras.layers.Layer):
    """QKeras QActivation: a quantizer (``"quantized_relu(4)"``, an instance) or a Keras
    activation (``"relu"``) as a layer."""

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        if isinstance(activation, dict) and "class_name" not in activation:
            activation = _quantizers.get(activation)
        try:
            self.quantizer = get_quantizer(activation)
        except ValueError:
            self.quantizer = None
            if not isinstance(activation, str):
                raise
        self.activation = None if self.quantizer is not None else keras.activations.get(activation)

    def build(self, input_shape):
        if self.quantizer is not None and not self.quantizer.built:
            self.quantizer.build(tuple(input_shape))
        self.built = True

    def call(self, inputs, training=None):
        if self.quantizer is not None:
            return self.quantizer(inputs, training=training)
        return self.activation(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        activation = (_quantizers.serialize(self.quantizer) if self.quantizer is not None
                      else keras.activations.serialize(self.activation))
        return {**super().get_config(), "activation": activation}


__all__ = ["QActivation", "QConv2D", "QDense", "binary", "get_quantizer", "quantized_bits",
           "quantized_relu", "ternary"]
