"""ALQ layers: the kernel is ``ŵ_g = B_g α_g`` per group, no latent float weights.

State (fixed shapes, so training compiles): ``bases`` ``[G, n, I_max]`` (±1,
stored as ``int8``, or ``bfloat16`` on JAX; see :func:`bases_dtype`),
``coordinates`` ``[G, I_max]`` (α ≥ 0), ``mask`` ``[G, I_max]`` (1 = active
basis; a group's bitwidth ``I_g`` is its number of active slots, 0 removes the
group). The forward kernel is ``Σ_i B_i α_i mask_i`` reshaped to the Keras
kernel (see :mod:`kquant.alq.groups`), plus ``kernel_tap``, computed in
float32 and cast to the layer's compute dtype (mixed precision keeps the
levels exact; the layer does not autocast its state).

``kernel_tap`` is a zero-valued trainable variable of the kernel's shape whose
only role is to receive ``∂ℓ/∂ŵ`` from autodiff: the ALQ optimizer
(:class:`kquant.optimizers.ALQ`) reads it and updates ``bases``,
``coordinates`` and ``mask``; the tap itself never moves. ``coordinates`` and
``mask`` are ``trainable=True`` with their autodiff gradient cut, because JAX's
stateless training step only writes back trainable and optimizer variables;
the bases are trainable on JAX only (see :func:`bases_trainable`).
The optimizer recognises these variables by the tag :data:`ALQ_ROLE` that
:meth:`ALQLayer.build` sets on them (``"tap"`` or ``"state"``).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kquant import xla
from kquant.accounting import LayerStats
from kquant.alq import groups as group_lib
from kquant.alq import sketching, steps
from kquant.alq.activations import ALQActivation

ALQ_ROLE = "_kquant_alq_role"
ALQ_LAYER = "_kquant_alq_layer"


def _tag(variable, role, layer):
    setattr(variable, ALQ_ROLE, role)
    setattr(variable, ALQ_LAYER, layer)


def bases_dtype() -> str:
    """Backend seam: the storage dtype of the ±1 bases.

    ``int8`` on TensorFlow and torch, where the bases are a non-trainable
    variable that the optimizer writes with ``assign``. ``bfloat16`` on JAX:
    there the bases must be trainable (Keras' stateless JAX step writes back
    only trainable and optimizer variables, so an optimizer ``assign`` to a
    non-trainable variable is lost), and ``jax.grad`` refuses integer inputs;
    float8 is no option either (``LossScaleOptimizer`` cannot divide a float8
    zero gradient by its float32 scale). ±1 are exact in all of them, and
    saved files hold the bases as int8 on every backend.
    """
    return "bfloat16" if keras.backend.backend() == "jax" else "int8"


def bases_trainable() -> bool:
    """Backend seam: whether the bases variable is trainable (JAX only; see :func:`bases_dtype`).

    torch refuses ``requires_grad`` on an integer tensor, so an int8 base
    cannot be a trainable variable there; TensorFlow follows the same rule.
    """
    return keras.backend.backend() == "jax"


def _as_int8(variable):
    return np.asarray(ops.convert_to_numpy(variable.value)).astype(np.float32).astype(np.int8)


def alq_role(variable):
    """``"tap"``, ``"state"`` or ``None`` for a (Keras or backend) variable."""
    return getattr(variable, ALQ_ROLE, None)


class ALQLayer(keras.layers.Layer):
    """Base of :class:`ALQDense` and :class:`ALQConv2D`."""

    default_group = "channel"

    def __init__(self, group=None, max_bits=6, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 input_quantizer=None, **kwargs):
        kwargs.setdefault("autocast", False)  # B, α stay float32 under mixed precision
        super().__init__(**kwargs)
        self.group = group_lib.canonical(self.default_group if group is None else group)
        self.max_bits = sketching.check_max_bits(max_bits)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        if isinstance(input_quantizer, dict):
            input_quantizer = keras.saving.deserialize_keras_object(input_quantizer)
        if input_quantizer is not None and not isinstance(input_quantizer, ALQActivation):
            raise TypeError("`input_quantizer` must be an ALQActivation or None, got "
                            f"{type(input_quantizer).__name__}.")
        self.input_quantizer = input_quantizer

    # -- what subclasses define ------------------------------------------------
    def _kernel_shape(self, input_shape):
        raise NotImplementedError

    def _apply_kernel(self, inputs, kernel):
        raise NotImplementedError

    def _macs(self, input_shape):
        raise NotImplementedError

    # -- state -----------------------------------------------------------------
    def build(self, input_shape):
        shape = self._kernel_shape(input_shape)
        self.layout = group_lib.GroupLayout(shape, self.group, f"layer {self.name!r}")
        g, n, bits = self.layout.num_groups, self.layout.group_size, self.max_bits
        self.bases = self.add_weight(name="bases", shape=(g, n, bits), initializer="ones",
                                     dtype=bases_dtype(), trainable=bases_trainable())
        self.coordinates = self.add_weight(name="coordinates", shape=(g, bits), initializer="zeros")
        self.mask = self.add_weight(name="mask", shape=(g, bits), initializer="zeros")
        self.kernel_tap = self.add_weight(name="kernel_tap", shape=shape, initializer="zeros")
        for variable in (self.bases, self.coordinates, self.mask):
            _tag(variable, "state", self)
        _tag(self.kernel_tap, "tap", self)
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(shape[-1],),
                                        initializer=self.bias_initializer)
        if self.input_quantizer is not None and not self.input_quantizer.built:
            self.input_quantizer.build(input_shape)
        self._input_shape_at_build = tuple(input_shape)
        try:
            initial = ops.convert_to_numpy(self.kernel_initializer(shape))
        except Exception:  # built inside a traced function: keep the all-zero kernel
            initial = None
        if initial is not None:
            self.set_float_kernel(initial)

    def set_float_kernel(self, kernel, sigma=1e-6):
        """Initialise ``B, α, mask`` from a float kernel by structured sketching (Alg. 1)."""
        kernel = np.asarray(kernel, dtype=np.float64)
        if kernel.shape != self.layout.kernel_shape:
            raise ValueError(f"`kernel` of shape {kernel.shape} does not fit layer {self.name!r} "
                             f"(kernel shape {self.layout.kernel_shape}).")
        bases, alpha, mask = sketching.sketch(self.layout.to_groups_numpy(kernel),
                                              self.max_bits, sigma)
        self.bases.assign(ops.cast(np.asarray(bases, dtype=np.float32), self.bases.dtype))
        self.coordinates.assign(alpha)
        self.mask.assign(mask)

    def _stored_variables(self):
        """Variables in file order: creation order on every backend (the bases'
        trainability differs between backends, so Keras' trainable-first order would not)."""
        own = [self.bases, self.coordinates, self.mask, self.kernel_tap]
        if self.bias is not None:
            own.append(self.bias)
        rest = [v for v in self._trainable_variables + self._non_trainable_variables
                if not any(v is o for o in own)]
        return own + rest

    def save_own_variables(self, store):
        # The ±1 bases are written as int8 on every backend (bfloat16 is no HDF5 type),
        # so a file saved on one backend loads on another.
        for i, v in enumerate(self._stored_variables()):
            store[f"{i}"] = _as_int8(v) if v is self.bases else v

    def load_own_variables(self, store):
        self._check_load_own_variables(store)
        for i, v in enumerate(self._stored_variables()):
            value = store[f"{i}"]
            if v is self.bases:
                value = ops.cast(np.asarray(value, dtype=np.float32), v.dtype)
            v.assign(value)

    def alq_state(self):
        """``(bases, coordinates, mask)`` variables."""
        return self.bases, self.coordinates, self.mask

    def grouped_kernel(self):
        """``ŵ`` as ``[G, n]``."""
        bases = ops.cast(ops.stop_gradient(self.bases), "float32")
        return steps.decode(bases, ops.stop_gradient(self.coordinates),
                            ops.stop_gradient(self.mask))

    def quantized_kernel(self, training=None):
        """The kernel the forward pass uses: ``B α mask`` reshaped (+ the zero tap).

        The decode is one XLA launch in a TensorFlow training graph that XLA does not
        compile (:func:`kquant.xla.compiled_in_graph`: it reads the int8 bases once;
        TF's kernels cast, multiply and transpose in passes of their own)."""
        decode = xla.compiled_in_graph(self._decoded_kernel, training)
        return decode(*(ops.stop_gradient(v) for v in self.alq_state())) + self.kernel_tap

    def _decoded_kernel(self, bases, coordinates, mask):
        return self.layout.from_groups(steps.decode(bases, coordinates, mask))

    @property
    def kernel(self):
        return self.quantized_kernel()

    def group_bitwidths(self):
        """Active bases per group, NumPy ``[G]`` ints."""
        return np.asarray(ops.convert_to_numpy(self.mask)).sum(axis=1).astype(int)

    def average_bitwidth(self) -> float:
        return float(self.group_bitwidths().mean())

    # -- forward -----------------------------------------------------------------
    def call(self, inputs, training=None):
        if self.input_quantizer is not None:
            inputs = self.input_quantizer(inputs, training=training)
        dtype = self.compute_dtype
        outputs = self._apply_kernel(ops.cast(inputs, dtype),
                                     ops.cast(self.quantized_kernel(training), dtype))
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    # -- accounting --------------------------------------------------------------
    def quantization_stats(self) -> LayerStats:
        """Storage per ALQ Eq. 26 plus the per-group bitwidth table."""
        bits = self.group_bitwidths()
        removed = int((bits == 0).sum())
        lut = self.layout.num_groups * group_lib.lut_bits_per_group(self.max_bits)
        return LayerStats(
            name=self.name,
            kind=type(self).__name__,
            kernel_params=self.layout.num_weights,
            kernel_bits=float(bits.mean()),
            float_params=int(self.bias.shape[0]) if self.bias is not None else 0,
            extra_bits=int(32 * bits.sum() + lut),
            input_bits=None if self.input_quantizer is None else float(self.input_quantizer.bits),
            macs=int(self._macs(self._input_shape_at_build)),
            notes=f"group {self.group} (n={self.layout.group_size}), "
                  f"{removed}/{self.layout.num_groups} groups removed, I_max={self.max_bits}",
        )

    def get_config(self):
        return {
            **super().get_config(),
            "group": self.group,
            "max_bits": self.max_bits,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "input_quantizer": None if self.input_quantizer is None
            else keras.saving.serialize_keras_object(self.input_quantizer),
        }


@keras.saving.register_keras_serializable(package="kquant")
class ALQDense(ALQLayer):
    """Dense layer whose kernel is ALQ multi-bit binary bases (groups default: channel)."""

    default_group = "channel"

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"`units` must be a positive integer, got {units!r}.")
        self.units = units

    def _kernel_shape(self, input_shape):
        return (int(input_shape[-1]), self.units)

    def _apply_kernel(self, inputs, kernel):
        return ops.matmul(inputs, kernel)

    def _macs(self, input_shape):
        return int(input_shape[-1]) * self.units

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _pair(value, name):
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be an int or a pair, got {value!r}.")
    return value


@keras.saving.register_keras_serializable(package="kquant")
class ALQConv2D(ALQLayer):
    """2-D convolution (channels_last) with an ALQ kernel (groups default: pixel)."""

    default_group = "pixel"

    def __init__(self, filters, kernel_size, strides=1, padding="valid", dilation_rate=1, **kwargs):
        data_format = kwargs.pop("data_format", None)
        if data_format not in (None, "channels_last"):
            raise ValueError("ALQConv2D supports data_format='channels_last' only, "
                             f"got {data_format!r}.")
        super().__init__(**kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"`filters` must be a positive integer, got {filters!r}.")
        self.filters = filters
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.dilation_rate = _pair(dilation_rate, "dilation_rate")
        if str(padding).lower() not in ("valid", "same"):
            raise ValueError(f"`padding` must be 'valid' or 'same', got {padding!r}.")
        self.padding = str(padding).lower()

    def _kernel_shape(self, input_shape):
        return (*self.kernel_size, int(input_shape[-1]), self.filters)

    def _apply_kernel(self, inputs, kernel):
        return ops.conv(inputs, kernel, strides=self.strides, padding=self.padding,
                        dilation_rate=self.dilation_rate, data_format="channels_last")

    def _output_spatial(self, input_shape):
        sizes = []
        for size, k, s, d in zip(input_shape[1:3], self.kernel_size, self.strides,
                                 self.dilation_rate):
            if size is None:
                sizes.append(None)
            elif self.padding == "same":
                sizes.append(-(-int(size) // s))
            else:
                sizes.append((int(size) - (k - 1) * d - 1) // s + 1)
        return sizes

    def _macs(self, input_shape):
        h, w = self._output_spatial(input_shape)
        if h is None or w is None:
            return 0
        kh, kw = self.kernel_size
        return h * w * kh * kw * int(input_shape[-1]) * self.filters

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._output_spatial(input_shape), self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides, "padding": self.padding,
                "dilation_rate": self.dilation_rate}


def alq_layers(model):
    """All ALQ layers of a model (nested models included), in order."""
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, ALQLayer):
            found.append(layer)
    return found
