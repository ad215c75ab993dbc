"""BatchNorm folding into the quantized layer before it (for deployment).

``BN(W·x + b) = g ⊙ (W·x) + (b − μ)·g + β`` with ``g = γ/√(σ² + ε)`` per output
channel (Jacob et al. 2018, §3.2). The codes stay the same; each channel's level
table is scaled by ``g`` (``fold_scale``, stored so the loader can still check
the levels against the quantizer) and the bias becomes ``(b − μ)·g + β``. The
BatchNormalization layer is replaced by ``Identity`` in the inference config.
Folds every Dense/Conv1D/Conv2D and depthwise Conv1D/Conv2D with
``depth_multiplier=1`` (its output channels are the kernel's input axis;
channels_last, no activation) with a kernel quantizer whose only consumer is a
BatchNormalization over the last axis.

After a binary activation the BatchNormalization folds further, into integer
thresholds (Larq Compute Engine's "BN → threshold", Bannink et al. 2021,
§3.2): see :func:`fold_thresholds`, applied first by :func:`fold_batch_norms`.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kquant.deploy.paths import structure


def _is_depthwise(layer):
    from kquant.layers import QuantDepthwiseConv1D, QuantDepthwiseConv2D

    return isinstance(layer, (QuantDepthwiseConv1D, QuantDepthwiseConv2D))


def fold_axis(layer, rank):
    """The kernel axis of the output channels: the last, or the input axis of a
    depthwise kernel ``(k…, in, 1)`` (output channel ``i`` is input channel ``i``)."""
    return rank - 2 if _is_depthwise(layer) else rank - 1


def fold_pairs(model):
    """``[(quantized layer path, layer, batch-norm path, batch norm)]`` that can be folded."""
    from kquant.layers import QuantConv1D, QuantConv2D, QuantDense

    _, layers = structure(model)
    path_of = {id(layer): p for p, layer in layers.items()}
    pairs = []
    for path, layer in layers.items():
        if not isinstance(layer, (QuantDense, QuantConv1D, QuantConv2D)) and not (
                _is_depthwise(layer) and layer.depth_multiplier == 1):
            continue
        if layer.kernel_quantizer is None or layer.activation not in (None, keras.activations.linear):
            continue
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            continue
        nodes = layer._outbound_nodes
        if len(nodes) != 1 or not isinstance(nodes[0].operation, keras.layers.BatchNormalization):
            continue
        bn = nodes[0].operation
        rank = len(layer.latent_kernel.shape) if isinstance(layer, QuantDense) else layer.rank + 2
        if len(bn._inbound_nodes) != 1 or bn.axis not in (-1, rank - 1) or id(bn) not in path_of:
            continue
        pairs.append((path, layer, path_of[id(bn)], bn))
    return pairs


def _find_config(config, names):
    """The layer config reached by following layer ``names`` through nested models."""
    for name in names:
        config = next(c for c in config["config"]["layers"] if c["config"]["name"] == name)
    return config


def _names(model, path):
    names, m = [], model
    for index in path.split("/"):
        layer = m.layers[int(index)]
        names.append(layer.name)
        m = layer
    return names


def fold_batch_norms(model, exp):
    """Fold in place every pair of :func:`fold_pairs` into the :class:`~.native.Export`
    (after :func:`fold_thresholds`, which takes the pairs followed by a binary activation)."""
    done = _fold_thresholds(model, exp)
    folded = [names for names, _ in done]
    done = {bnpath for _, bnpath in done}
    for qpath, layer, bnpath, bn in fold_pairs(model):
        if bnpath in done:
            continue
        kkey = f"{qpath}/{layer.latent_kernel.name}"
        entry = exp.entry(kkey)
        rank = len(entry["shape"])
        axis = fold_axis(layer, rank)
        if entry["channel_axis"] not in (None, axis):
            continue
        channels = entry["shape"][axis]
        mean = np.asarray(ops.convert_to_numpy(bn.moving_mean), np.float64)
        var = np.asarray(ops.convert_to_numpy(bn.moving_variance), np.float64)
        gamma = np.asarray(ops.convert_to_numpy(bn.gamma), np.float64) if bn.scale else 1.0
        beta = np.asarray(ops.convert_to_numpy(bn.beta), np.float64) if bn.center else 0.0
        g = gamma / np.sqrt(var + bn.epsilon) * np.ones(channels)
        levels = np.broadcast_to(exp.arrays[f"{kkey}:levels"], (channels, 2 ** entry["bits"]))
        exp.arrays[f"{kkey}:levels"] = (levels * g[:, None]).astype(np.float32)
        exp.arrays[f"{kkey}:fold_scale"] = g.astype(np.float32)
        entry.update(channel_axis=axis, fold_scale=True)
        bias_key = f"{qpath}/bias"
        bias = exp.arrays.pop(f"{bias_key}:value", np.zeros(channels, np.float32))
        exp.entries = [e for e in exp.entries
                       if e["path"] != bias_key and not e["path"].startswith(bnpath + "/")]
        exp.arrays = {k: v for k, v in exp.arrays.items() if not k.startswith(bnpath + "/")}
        exp.add({"path": bias_key, "kind": "float", "shape": [channels], "dtype": "float32"},
                value=((bias - mean) * g + beta).astype(np.float32))
        _find_config(exp.config, _names(model, qpath))["config"]["use_bias"] = True
        bn_config = _find_config(exp.config, _names(model, bnpath))
        identity = keras.saving.serialize_keras_object(
            keras.layers.Identity(name=bn.name, dtype=bn.dtype_policy.name))
        for k in ("class_name", "module", "registered_name", "config"):
            bn_config[k] = identity.get(k)
        for node in bn_config.get("inbound_nodes", []):  # Identity takes no `mask`/`training`
            if isinstance(node, dict):
                node["kwargs"] = {}
        folded.append((layer.name, bn.name))
    return folded


# -- BN → integer thresholds after a binary activation ------------------------------
@keras.saving.register_keras_serializable(package="kquant")
class BinaryThreshold(keras.layers.Layer):
    """``Q(BN(W·x + b))`` for binary ``Q``, folded (inference only).

    With the layer's kernel levels replaced by ±1 and inputs ``±s_in`` its output
    is ``x = s_in·p`` with ``p`` the integer XNOR/popcount sum, and
    ``Q(BN(·))`` of that is ``high`` where ``d·p ≥ d·τ`` else ``low``, per channel:
    ``d = +1`` (``γ > 0``: ``p ≥ τ``), ``d = −1`` (``γ < 0``: ``p ≤ τ``), a
    constant channel (``γ = 0``) has ``τ = ∓(K + 1)`` (Larq Compute Engine's
    BN → threshold fold; Bannink et al. 2021, "Larq Compute Engine", §3.2).
    ``thresholds`` ``τ`` are int32, ``directions`` ``d`` int8.
    """

    def __init__(self, low, high, input_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.input_scale = float(low), float(high), float(input_scale)
        if not self.input_scale > 0:
            raise ValueError(f"`input_scale` must be > 0, got {input_scale!r}.")

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.thresholds = self.add_weight(name="thresholds", shape=(channels,), dtype="int32",
                                          initializer="zeros", trainable=False)
        self.directions = self.add_weight(name="directions", shape=(channels,), dtype="int8",
                                          initializer="ones", trainable=False)

    def call(self, inputs):
        t = ops.cast(self.thresholds, inputs.dtype) * ops.cast(self.input_scale, inputs.dtype)
        # d·x ≥ d·t without multiplying x (an exporter may fuse such a Mul into the kernel)
        high = ops.where(self.directions > 0, ops.greater_equal(inputs, t),
                         ops.less_equal(inputs, t))
        return ops.where(high, ops.cast(self.high, inputs.dtype), ops.cast(self.low, inputs.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high,
                "input_scale": self.input_scale}


def _exact_multiples(p, count):
    """Whether ``m·p`` is exact in float32 for every integer ``|m| ≤ count`` (so any sum
    of ``count`` terms ``±p`` is computed exactly, in any order)."""
    p = float(np.float32(abs(p)))
    if not (np.isfinite(p) and p >= 2.0**-100 and p * count < 2.0**100):
        return False
    mantissa, _ = np.frexp(p)  # p = mantissa·2^e, 0.5 ≤ mantissa < 1, 24 significant bits
    odd = int(mantissa * 2**24)
    while odd % 2 == 0:
        odd //= 2
    return odd * count < 2**24


def _binary_levels(quantizer, shape):
    """``(low, high)`` if ``quantizer`` maps every input to one of two values, sign-like."""
    if quantizer is None or int(getattr(quantizer, "precision", 0)) != 1:
        return None
    big = np.full(shape, 1e4, np.float32)
    probe = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    try:
        out = [np.asarray(ops.convert_to_numpy(quantizer(ops.convert_to_tensor(v),
                                                          training=False)), np.float32)
               for v in (-big, big, probe)]
    except Exception:  # noqa: BLE001 - a quantizer that cannot be probed is not folded
        return None
    low, high = out[0].ravel()[0], out[1].ravel()[0]
    if not (np.all(out[0] == low) and np.all(out[1] == high) and low < high):
        return None
    if not np.all((out[2] == low) | (out[2] == high)):
        return None
    return float(low), float(high)


def _binary_consumer(bn):
    """The binary quantizer right after ``bn`` (a QuantActivation, or the input quantizer
    of the next quantized layer, past Flatten/Reshape), if it is ``bn``'s only consumer."""
    from kquant.layers import QuantActivation
    from kquant.layers.base import QuantizedLayerMixin

    consumer = bn
    while True:  # through layers that only move values (elementwise Q commutes with them)
        nodes = consumer._outbound_nodes
        if len(nodes) != 1:
            return None
        consumer = nodes[0].operation
        if not isinstance(consumer, (keras.layers.Flatten, keras.layers.Reshape,
                                     keras.layers.Identity, keras.layers.Dropout)):
            break
    if isinstance(consumer, QuantActivation):
        return consumer.quantizer
    if isinstance(consumer, QuantizedLayerMixin):
        return consumer.input_quantizer
    return None


def _threshold_table(layer, bn, after, p, fan_in, shape):
    """``(τ [C], d [C])`` from the unfolded tail evaluated at every possible popcount sum.

    ``p [C]``: a product ``|w|·|x|`` per channel; the layer's pre-bias output is
    ``p·m`` for an integer ``m ∈ [−K, K]`` (K = ``fan_in``, zero padding included).
    Bias add, BatchNormalization and ``after`` are run by the backend exactly as in
    the model, and are monotone in ``m`` (float rounding is monotone), so each
    channel's output is a step: ``τ`` is read off it. ``None`` if it is not.
    """
    channels = p.shape[0]
    m = np.arange(-fan_in, fan_in + 1)
    pre = (m[:, None].astype(np.float64) * p[None, :].astype(np.float64)).astype(np.float32)
    x = ops.convert_to_tensor(pre.reshape((pre.shape[0],) + (1,) * (len(shape) - 2) + (channels,)))
    if layer.use_bias:
        x = ops.add(x, layer.bias)
    out = ops.convert_to_numpy(after(bn(x, training=False), training=False))
    out = np.asarray(out, np.float32).reshape(pre.shape)
    low, high = _binary_levels(after, (1,) * (len(shape) - 1) + (channels,))
    high_mask = out == high
    if not np.all(high_mask | (out == low)):
        return None
    thresholds, directions = np.zeros(channels, np.int64), np.ones(channels, np.int64)
    for c in range(channels):
        column = high_mask[:, c]
        rising = np.all(column[1:] >= column[:-1])
        if rising:
            thresholds[c] = m[column].min() if column.any() else fan_in + 1
        elif np.all(column[1:] <= column[:-1]):
            thresholds[c], directions[c] = m[column].max(), -1
        else:
            return None
    return thresholds, directions


def _fold_thresholds(model, exp):
    """Fold ``binary layer → BN → binary quantizer`` into :class:`BinaryThreshold`.

    Applies where the layer (a :func:`fold_pairs` layer, float32) has a 1-bit kernel
    with levels ``±a_c`` and a 1-bit input quantizer with levels ``±s``, so its
    output is ``a_c·s·(integer sum)``, exact in float32 (checked: ``|m|·a_c·s``
    exact for ``|m| ≤ K + 1``), and BN's only consumer quantizes to two levels
    ``low < high`` it maps to themselves. The kernel's levels become ``±1``
    (``fold_scale = 1/a_c``), the bias goes into ``τ``, BN becomes
    :class:`BinaryThreshold`. Returns ``[((layer name, bn name), bn path)]``.
    """
    done = []
    for qpath, layer, bnpath, bn in fold_pairs(model):
        after = _binary_consumer(bn)
        if after is None or layer.compute_dtype != "float32" or bn.compute_dtype != "float32":
            continue
        if layer.input_quantizer is None:
            continue
        try:
            in_shape = tuple(4 if d is None else int(d) for d in layer.input.shape)
            out_shape = tuple(4 if d is None else int(d) for d in layer.output.shape)
        except (AttributeError, ValueError):
            continue
        levels_in = _binary_levels(layer.input_quantizer, in_shape)
        if levels_in is None or levels_in[0] != -levels_in[1]:
            continue
        if _binary_levels(after, out_shape) is None:
            continue
        kkey = f"{qpath}/{layer.latent_kernel.name}"
        entry = exp.entry(kkey)
        rank, channels = len(entry["shape"]), out_shape[-1]
        axis = fold_axis(layer, rank)
        if entry["bits"] != 1 or entry["channel_axis"] not in (None, axis) \
                or entry["shape"][axis] != channels or f"{kkey}:fold_scale" in exp.arrays:
            continue
        levels = np.broadcast_to(exp.arrays[f"{kkey}:levels"], (channels, 2)).astype(np.float64)
        a = levels.max(axis=1)
        if not (np.all(levels.min(axis=1) == -a) and np.all(a > 0)):
            continue
        s = levels_in[1]
        fan_in = int(np.prod(entry["shape"])) // (channels if _is_depthwise(layer)
                                                   else int(entry["shape"][-1]))
        p = (a * s).astype(np.float32)
        if not (np.all(p.astype(np.float64) == a * s) and _exact_multiples(s, fan_in + 1)
                and all(_exact_multiples(v, fan_in + 1) for v in p)):
            continue
        table = _threshold_table(layer, bn, after, p, fan_in, out_shape)
        if table is None:
            continue
        thresholds, directions = table
        low, high = _binary_levels(after, out_shape)
        # kernel: codes unchanged, levels ±1 per channel
        exp.arrays[f"{kkey}:levels"] = np.sign(levels).astype(np.float32)
        exp.arrays[f"{kkey}:fold_scale"] = (1.0 / a).astype(np.float32)
        entry.update(channel_axis=axis, fold_scale=True)
        bias_key = f"{qpath}/bias"
        exp.arrays.pop(f"{bias_key}:value", None)
        exp.entries = [e for e in exp.entries
                       if e["path"] != bias_key and not e["path"].startswith(bnpath + "/")]
        exp.arrays = {k: v for k, v in exp.arrays.items() if not k.startswith(bnpath + "/")}
        exp.add({"path": f"{bnpath}/thresholds", "kind": "float", "shape": [channels],
                 "dtype": "int32"}, value=thresholds.astype(np.int32))
        exp.add({"path": f"{bnpath}/directions", "kind": "float", "shape": [channels],
                 "dtype": "int8"}, value=directions.astype(np.int8))
        _find_config(exp.config, _names(model, qpath))["config"]["use_bias"] = False
        replacement = keras.saving.serialize_keras_object(BinaryThreshold(
            low, high, input_scale=s, name=bn.name, dtype=bn.dtype_policy.name))
        bn_config = _find_config(exp.config, _names(model, bnpath))
        for k in ("class_name", "module", "registered_name", "config"):
            bn_config[k] = replacement.get(k)
        for node in bn_config.get("inbound_nodes", []):
            if isinstance(node, dict):
                node["kwargs"] = {}
        done.append(((layer.name, bn.name), bnpath))
    return done


def fold_thresholds(model, exp):
    """Fold BN into integer thresholds where a binary activation follows (in place, on
    the :class:`~.native.Export`); ``[(layer name, bn name)]`` folded. See
    :class:`BinaryThreshold` and :func:`_fold_thresholds` for when it applies."""
    return [names for names, _ in _fold_thresholds(model, exp)]
